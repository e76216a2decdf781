"""Low-rank gradient projectors: one interface, three ways to pick the subspace.

For a weight W in R^{m x n} with gradient G, rank r and scale alpha (GaLore, Zhao et al. 2024):

* m >= n ("right" side): P in R^{r x n} with orthonormal rows,    R = G P^T (m x r),  back(N) = alpha * N P
* m <  n ("left" side):  P in R^{m x r} with orthonormal columns, R = P^T G (r x n),  back(N) = alpha * P N

so the low-rank state is always r x max(m, n) and the projector r x min(m, n).  P is refreshed from the current
gradient every T = ``update_proj_gap`` optimizer steps (at per-parameter step 0, T, 2T, ... counted before the
increment, exactly like galore-torch).

A projector is a thin view on the optimizer's per-parameter state dict: everything it keeps lives there as
tensors (``proj_ortho`` for SVD kinds, ``proj_indices`` for DCT, only a seed for "random") plus the group's plain config, so
``optimizer.state_dict()`` loads with ``torch.load(weights_only=True)`` (ms-swift #10161 was bitten by pickled
projector objects).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from leantune.optim.svd import orient_basis, orientation, thin_svd


def scale_early(low_rank: torch.Tensor, scale: float) -> tuple[torch.Tensor, float | None]:
    """``(low_rank', late)`` with back(low_rank') · late bit for bit equal to back(low_rank) · scale, the cheap way.

    The references (galore-torch, Fira) scale the full-size back-projection: one more m·n pass. A scale of 1 needs
    no pass, and a power of two commutes exactly with every rounding of the product (it only moves exponents), so
    it is applied to the r-sided low-rank factor instead (not in fp16, whose subnormals start at 6e-5); any other
    scale stays where the references put it (``late``). Only values within a factor ``scale`` of the float32 /
    bfloat16 underflow (1e-38) could round differently.
    """
    if scale == 1:
        return low_rank, None
    mantissa, _ = math.frexp(scale)
    if mantissa in (0.5, -0.5) and low_rank.dtype != torch.float16:  # fp16 reaches its subnormals at 6e-5
        return low_rank * scale, None
    return low_rank, scale


class Projector:
    """Common interface: ``needs_refresh``, ``refresh``, ``project``, ``project_back`` (with scale), ``matrix``.

    Args:
        state: the optimizer's state dict for this parameter; the projector reads/writes its tensors there.
        rank: r (clamped to min(m, n), as the reference does).
        update_proj_gap: T, refresh period in optimizer steps.
        scale: alpha, multiplies the back-projected update (acts as a fractional learning rate).
    """

    state_keys: tuple[str, ...] = ("proj_right",)  #: what it writes into the parameter's state

    kind = "base"
    #: one-sided (P on one side of G), so the fused optimizer kernel and moment rotation apply
    one_sided = True

    def __init__(self, state: dict[str, Any], rank: int, update_proj_gap: int, scale: float) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be >= 1, got {update_proj_gap}")
        self.state = state
        self.rank = int(rank)
        self.update_proj_gap = int(update_proj_gap)
        self.scale = float(scale)

    # ---- side rule ------------------------------------------------------------------------------------------
    @staticmethod
    def is_right(full_shape: torch.Size | tuple[int, ...]) -> bool:
        """GaLore 'std' side rule: tall (m >= n) gradients project on the right."""
        return full_shape[0] >= full_shape[1]

    # ---- interface ------------------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        raise NotImplementedError

    def needs_refresh(self, step: int) -> bool:
        return (not self.initialized) or step % self.update_proj_gap == 0

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        """Recompute P from ``grad``.  Returns False (and keeps the previous P) when that fails."""
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """P: r x n (right side) or m x r (left side)."""
        raise NotImplementedError

    def project(self, grad: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """R = project(diag(rows) G): G Pᵀ (row scale applied to the m × r result) or Pᵀ G (folded into P)."""
        P = self.matrix()
        if self.state["proj_right"]:
            R = torch.matmul(grad, P.t())
            if rows is None:
                return R
            return R.mul_(rows[:, None]) if R.dtype == rows.dtype else (R.float() * rows[:, None]).to(R.dtype)
        return torch.matmul(_row_scaled(P, rows).t(), grad)

    def complete(self, low_rank: torch.Tensor) -> torch.Tensor:
        """The whole low-rank direction the back-projection needs from what this process computed (itself; FSDP2's
        divided columns are gathered by ``sharded.ShardedProjector``)."""
        return low_rank

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        """α · back(low_rank): α (P R) or α (R P), in the references' rounding (the product, then × α)."""
        P = self.matrix()
        low_rank, late = scale_early(low_rank, self.scale)
        if self.state["proj_right"]:
            full = torch.matmul(low_rank, P)
        else:
            full = torch.matmul(P, low_rank)
        return full if late is None else full * late

    def add_back(self, target: torch.Tensor, low_rank: torch.Tensor, alpha: float, beta: float = 1.0,
                 rows: torch.Tensor | None = None) -> None:
        """target ← beta · target + alpha · diag(rows) back(low_rank), as one GEMM into ``target`` (``addmm_``).

        ``rows`` (m,) scales the rows of the back-projection; it is folded into the m-sided factor (N on the right
        side, P on the left), an m × r product instead of an m × n pass."""
        P = self.matrix()
        low_rank = low_rank.to(P.dtype)
        if self.state["proj_right"]:
            target.addmm_(_row_scaled(low_rank, rows), P, beta=beta, alpha=alpha * self.scale)
        else:
            target.addmm_(_row_scaled(P, rows), low_rank, beta=beta, alpha=alpha * self.scale)

    def subtract_back(self, full: torch.Tensor, low_rank: torch.Tensor, alpha: float) -> torch.Tensor:
        """full − alpha · back(low_rank) / scale (the unscaled back-projection), as one GEMM into a new tensor."""
        P = self.matrix()
        if self.state["proj_right"]:
            return torch.addmm(full, low_rank.to(P.dtype), P, alpha=-alpha)
        return torch.addmm(full, P, low_rank.to(P.dtype), alpha=-alpha)

    def transition(self, old_matrix: torch.Tensor) -> torch.Tensor:
        """Change of basis that carries a low-rank state from the old subspace into the new one.

        right: R_new ~= R_old (P_old P_new^T)   (multiply on the right);
        left:  R_new ~= (P_new^T P_old) R_old   (multiply on the left).
        """
        new = self.matrix()
        if self.state["proj_right"]:
            return old_matrix.float() @ new.float().t()
        return new.float().t() @ old_matrix.float()

    # ---- helpers --------------------------------------------------------------------------------------------
    def _accept(self, grad: torch.Tensor, new: torch.Tensor | None, reason: str) -> bool:
        if new is not None and bool(torch.isfinite(new).all()):
            self.state["proj_ortho"] = new
            return True
        kept = "keeping the previous projector" if self.initialized else "no projector yet, skipping this update"
        warnings.warn(
            f"{self.kind} projector refresh failed for a gradient of shape {tuple(grad.shape)} ({reason}); {kept}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def _row_scaled(factor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """diag(rows) · factor (m × r), in the factor's dtype; the factor itself when ``rows`` is None."""
    return factor if rows is None else factor * rows.to(factor.dtype)[:, None]


def compact_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` holding only its elements, in ``t``'s own memory order (row- or column-major).

    ``torch.linalg.svd`` returns column-major factors and galore-torch / fira keep the slice ``Vh[:r]`` / ``U[:, :r]``
    as a view of them. CPU GEMM libraries pick different kernels (and round differently) for row- and column-major
    operands, so a row-major copy would not reproduce the references bitwise on every CPU (MKL_CBWR=COMPATIBLE shows
    it on any x86); keeping the order does, while freeing the full factor.
    """
    if t.dim() == 2 and t.stride(0) < t.stride(1):
        return t.t().clone(memory_format=torch.contiguous_format).t()
    return t.clone(memory_format=torch.contiguous_format)  # a copy even when t is already contiguous


def _fresh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A row-major copy of ``t`` in ``dtype`` (one copy, never a view of the SVD's factors: orientation is in place)."""
    return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _grad_as_fp32(grad: torch.Tensor) -> torch.Tensor:
    # galore-torch: SVD of grad.float(), reuse the tensor itself when it is already fp32 (bitwise parity)
    return grad if grad.dtype in (torch.float32, torch.float64) else grad.float()


def _svd_or_reason(grad: torch.Tensor, raw: bool) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(U, Vh)`` of the thin SVD of ``grad`` (fp32 for half dtypes), or why it cannot be taken (the reason a
    refresh reports when it keeps the previous projector). ``raw``: LAPACK's signs, as the references."""
    if not bool(torch.isfinite(grad).all()):
        return "non-finite gradient"
    try:
        U, _, Vh = thin_svd(_grad_as_fp32(grad), raw=raw)
    except RuntimeError as err:  # e.g. "linalg.svd: failed to converge" (GaLore #58)
        return f"torch.linalg.svd raised: {err}"
    return U, Vh


class StoredBasisProjector(Projector):
    """Projectors that keep P itself in ``state["proj_ortho"]`` (written by :meth:`Projector._accept`).

    A new basis is sign-oriented (``leantune.optim.svd``: canonical the first time, then aligned with the previous
    basis) unless ``raw_signs`` (the references' LAPACK signs, for bitwise parity with galore-torch / fira).
    ``overlap``: how ⟨p_old, p_new⟩ is summed when the state holds only this rank's rows of P (FSDP2).
    """

    state_keys = ("proj_right", "proj_ortho")

    def __init__(self, state: dict[str, Any], rank: int, update_proj_gap: int, scale: float,
                 raw_signs: bool = False) -> None:
        super().__init__(state, rank, update_proj_gap, scale)
        self.raw_signs = raw_signs
        self.overlap = None

    @property
    def initialized(self) -> bool:
        return "proj_ortho" in self.state

    def matrix(self) -> torch.Tensor:
        return self.state["proj_ortho"]

    def _oriented(self, new: torch.Tensor) -> torch.Tensor:
        """``new`` (a tensor of its own) with sign-consistent vectors, or as it is with ``raw_signs``."""
        if self.raw_signs:
            return new
        return orient_basis(new, self.state.get("proj_ortho"), self.state["proj_right"], self.overlap)


class SVDProjector(StoredBasisProjector):
    """Exact truncated SVD: G = U S V^T, P = V^T[:r] (right) or U[:, :r] (left).

    The slice is stored as a compact copy in the gradient's dtype so the full U / V^T factors are freed (a view would
    keep the whole factor alive: min(m,n)^2 floats instead of r*min(m,n)); in fp32 the copy keeps the factor's
    column-major order, as the references' view has it (:func:`compact_like`), and other dtypes are converted to a
    row-major copy, as the references' ``.type(dtype)`` does.
    """

    kind = "svd"

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        self.state["proj_right"] = self.is_right(grad.shape)
        factors = _svd_or_reason(grad, self.raw_signs)
        if isinstance(factors, str):
            return self._accept(grad, None, factors)
        U, Vh = factors
        new = Vh[: self.rank, :] if self.state["proj_right"] else U[:, : self.rank]
        new = compact_like(new) if grad.dtype == torch.float32 else _fresh(new, grad.dtype)
        return self._accept(grad, self._oriented(new), "non-finite singular vectors")


class RandomizedSVDProjector(StoredBasisProjector):
    """Randomized range finder (Halko, Martinsson & Tropp 2011), GaLore-2 style.

    With k = r + oversample and a Gaussian test matrix Omega: Y = (A A^T)^q A Omega, Q = qr(Y), B = Q^T A,
    B = U_B S V^T, U = Q U_B.  A is G (left side) or G^T (right side) so the sketch always spans the min(m,n)-dim
    side.  The Gaussian is drawn from a generator seeded by (param seed, step), so results are reproducible and
    a resumed run draws the same sketch.
    """

    kind = "rsvd"

    def __init__(self, state, rank, update_proj_gap, scale, oversample: int = 8, power_iters: int = 2, seed: int = 0,
                 raw_signs: bool = False):
        super().__init__(state, rank, update_proj_gap, scale, raw_signs)
        self.oversample = oversample
        self.power_iters = power_iters
        self.seed = seed

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        right = self.is_right(grad.shape)
        self.state["proj_right"] = right
        if not bool(torch.isfinite(grad).all()):
            return self._accept(grad, None, "non-finite gradient")
        A = _grad_as_fp32(grad)
        A = A.t() if right else A  # rows of A = the small side (min(m, n))
        rows, cols = A.shape
        k = min(self.rank + self.oversample, rows, cols)
        gen = torch.Generator(device=A.device)
        gen.manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))
        omega = torch.randn(cols, k, generator=gen, device=A.device, dtype=A.dtype)
        try:
            Q = torch.linalg.qr(A @ omega).Q
            for _ in range(self.power_iters):
                Q = torch.linalg.qr(A.t() @ Q).Q
                Q = torch.linalg.qr(A @ Q).Q
            U_B, _, _ = thin_svd(Q.t() @ A, raw=self.raw_signs)
        except RuntimeError as err:
            return self._accept(grad, None, f"randomized SVD raised: {err}")
        U = (Q @ U_B)[:, : self.rank]  # basis of the small side: n x r (right) or m x r (left)
        new = _fresh(U.t() if right else U, grad.dtype)
        return self._accept(grad, self._oriented(new), "non-finite singular vectors")


class TwoSidedSVDProjector(StoredBasisProjector):
    """Both sides (GradNormLoRP's D̃ = U ρ(Uᵀ D V) Vᵀ, Huang et al. 2025): R = U_rᵀ G V_r (r x r core),
    back(N) = alpha U_r N V_rᵀ, with U_r, V_r the top-r singular vectors of G (refreshed every T steps).

    Stores U_r (m x r) in ``proj_ortho`` and V_rᵀ (r x n) in ``proj_ortho_right``: the moments shrink to r x r. A pair
    (u_i, v_i) flips together, its sign oriented by u_i (the left basis: canonical, then aligned with the previous).
    """

    state_keys = ("proj_right", "proj_ortho", "proj_ortho_right")

    kind = "svd2"
    one_sided = False

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        self.state["proj_right"] = self.is_right(grad.shape)
        factors = _svd_or_reason(grad, self.raw_signs)
        if isinstance(factors, str):
            return self._accept(grad, None, factors)
        U, Vh = factors
        left, right = _fresh(U[:, : self.rank], grad.dtype), _fresh(Vh[: self.rank], grad.dtype)
        if not self.raw_signs:
            signs = orientation(left, self.state.get("proj_ortho"), right=False).to(grad.dtype)
            left.mul_(signs[None, :])
            right.mul_(signs[:, None])
        if not bool(torch.isfinite(right).all()):
            return self._accept(grad, None, "non-finite singular vectors")
        ok = self._accept(grad, left, "non-finite singular vectors")
        if ok:
            self.state["proj_ortho_right"] = right
        return ok

    def project(self, grad: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return _row_scaled(self.state["proj_ortho"], rows).t() @ grad @ self.state["proj_ortho_right"].t()

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        low_rank, late = scale_early(low_rank, self.scale)
        full = self.state["proj_ortho"] @ low_rank @ self.state["proj_ortho_right"]
        return full if late is None else full * late

    def add_back(self, target: torch.Tensor, low_rank: torch.Tensor, alpha: float, beta: float = 1.0,
                 rows: torch.Tensor | None = None) -> None:
        target.addmm_(_row_scaled(self.state["proj_ortho"], rows) @ low_rank, self.state["proj_ortho_right"],
                      beta=beta, alpha=alpha * self.scale)

    def subtract_back(self, full: torch.Tensor, low_rank: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.addmm(full, self.state["proj_ortho"] @ low_rank, self.state["proj_ortho_right"], alpha=-alpha)


def next_seed(seed: int, draws: int = 15) -> int:
    """The seed after ``seed``: the last of ``draws`` int64 draws in [0, 2^63 - 1) of a CPU generator seeded with it
    (APOLLO's rule, so a sequence of random projections is reproducible from its first seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (draws,), generator=gen)[-1])


class RandomProjector(Projector):
    """Gaussian random projection regenerated from a seed (APOLLO, Zhu et al. 2025, arXiv 2412.05270).

    P has i.i.d. N(0, 1/r) entries: r x n (right side, m >= n) or m x r (left side), drawn in fp32 by a generator of
    the gradient's device seeded with ``proj_seed`` and cast to the gradient's dtype. Only the seed is stored
    (``proj_seed``; ``proj_dim`` and the 0-element ``proj_dtype_ref`` say the shape, dtype and device), and P is
    regenerated at every use: the state holds no r x min(m, n) matrix (the paper's memory accounting), at the cost of
    one ``randn`` of r * min(m, n) numbers per step. The draws are those of apollo-torch 1.0.3, so results match it
    bitwise; like it, the same seed gives a different P on CUDA than on CPU (each device's generator).

    Refresh (every T steps): the first P uses the parameter's seed, each later one ``next_seed`` of the previous.
    """

    state_keys = ("proj_right", "proj_seed", "proj_dim", "proj_dtype_ref")

    kind = "random"

    def __init__(self, state: dict[str, Any], rank: int, update_proj_gap: int, scale: float, seed: int = 1):
        super().__init__(state, rank, update_proj_gap, scale)
        self.seed = seed

    @property
    def initialized(self) -> bool:
        return "proj_seed" in self.state

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        self._P = None
        right = self.is_right(grad.shape)
        self.state["proj_seed"] = next_seed(self.state["proj_seed"]) if self.initialized else int(self.seed)
        self.state["proj_right"] = right
        self.state["proj_dim"] = grad.shape[1] if right else grad.shape[0]
        self.state["proj_dtype_ref"] = torch.empty(0, dtype=grad.dtype, device=grad.device)
        return True

    def matrix(self) -> torch.Tensor:
        if getattr(self, "_P", None) is None:  # a projector object lives for one step: draw P once per step
            self._P = self._draw()
        return self._P

    def _draw(self) -> torch.Tensor:
        ref, d = self.state["proj_dtype_ref"], self.state["proj_dim"]
        shape = (self.rank, d) if self.state["proj_right"] else (d, self.rank)
        gen = torch.Generator(device=ref.device).manual_seed(self.state["proj_seed"])
        P = torch.randn(shape, generator=gen, device=ref.device, dtype=torch.float32) / math.sqrt(self.rank)
        return P if ref.dtype == torch.float32 else P.to(ref.dtype)


def subspace_distance(P1: torch.Tensor, P2: torch.Tensor) -> float:
    """||P1^T P1 - P2^T P2||_F / sqrt(r) for row-orthonormal P (use P^T for left projectors): 0 = same subspace."""
    a, b = P1.double(), P2.double()
    return float(torch.linalg.norm(a.t() @ a - b.t() @ b) / math.sqrt(max(a.shape[0], 1)))
