"""FiraAdamW: GaLore plus a norm-scaled full-rank residual (Chen et al., arXiv 2410.01623).

After the GaLore Adam step (R = project(G), N = Adam-normalised R, see ``galore_adamw.py``):

    S     = G - alpha * back(R)                  residual outside the subspace (reference: alpha-scaled; the paper's
                                                 orthogonal G - back(R) with ``orthogonal_residual=True``)
    phi   = ||N||_d / (||R||_d + 1e-8)           per column (R wide, r x n) or per row (R tall, m x r)
    S     = S * phi                              Adam-like rescaling of the residual ("norm-based scaling")
    limiter (gamma = 1.01): if ||S_t|| / ||S_{t-1}|| > gamma then S_t <- S_t * gamma ||S_{t-1}|| / ||S_t||
    W    <- W - eta_t (alpha * back(N) + S)

The only extra state is the previous residual norm (one scalar per matrix). :meth:`FiraAdamW.residual` forms S as
written (the readable rule, and the references' arithmetic); its twins, picked by :meth:`FiraAdamW.path` and each
tested against it (``tests/optim/test_paths.py``), avoid that: ``gemm`` forms S₀ = G − α back(R) in one GEMM, and
for |1 − α| ≥ 1/2 ``merged`` never forms it (its norm from the channel norms of G and R, its low-rank part riding in
GaLore's back-projection GEMM), so Fira costs GaLore's two products plus one pass over G; ``fused`` is the CUDA
kernel with S as its residual input.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from leantune._utils import channel_norms
from leantune.optim.base import LowRankOptimizer
from leantune.optim.galore_adamw import GaLoreAdamW, adam_direction
from leantune.optim.sharded import norm_over_rows
from leantune.optim.step import ParamStep

#: projectors whose P has orthonormal rows (right side) or columns (left side)
ORTHONORMAL_KINDS = ("svd", "rsvd", "dct")


class FiraAdamW(GaLoreAdamW):
    """GaLoreAdamW + Fira residual.  Extra args: ``gamma`` (limiter, 1.01), ``orthogonal_residual`` (False =
    fira 1.0.2 behaviour).  With ``reference_adam=True`` in fp32 it matches the ``fira`` package bitwise."""

    state_keys = LowRankOptimizer.state_keys + ("fira_prev_norm",)

    def __init__(
        self, params: Iterable[Any], *args: Any, gamma: float = 1.01, orthogonal_residual: bool = False, **kwargs: Any
    ) -> None:
        if gamma < 1.0:
            raise ValueError(f"gamma (norm-growth limit) must be >= 1, got {gamma}")
        super().__init__(params, *args, _extra_defaults={"gamma": gamma, "orthogonal_residual": orthogonal_residual},
                         **kwargs)

    group_aliases = {"alpha": "scale"}  # the fira package's name for the GaLore scale
    replicated_shardable = False
    replicated_refusal = "Fira's residual S = G − back(R) and its scaling need the whole projected gradient R"

    #: twins of the readable rule (``readable`` forms S as the formula says); ``path`` picks one (GaLoreAdamW.path)
    paths = ("readable", "gemm", "merged", "fused")

    def path(self, s: ParamStep) -> str:
        """GaLore's rule, with the merged update (:meth:`merged`) instead of the GEMM twin where it applies."""
        path = super().path(s)
        if path == "gemm" and self.force_path is None and self._merge_applies(s):
            return "merged"
        if path == "merged" and not self._merge_applies(s):
            raise ValueError("force_path='merged': Fira's merged update needs α > 0, |1 − α'| ≥ 1/2 and a one-sided "
                             "orthonormal projector (svd, rsvd, dct)")
        return path

    @staticmethod
    def _merge_applies(s: ParamStep) -> bool:
        alpha = s.P.scale
        alpha_res = 1.0 if s.group["orthogonal_residual"] and alpha != 0 else alpha
        return alpha > 0 and abs(1.0 - alpha_res) >= 0.5 and s.P.one_sided and s.P.kind in ORTHONORMAL_KINDS

    def residual(self, s: ParamStep) -> torch.Tensor:
        """The readable S = (G − α back(R)) · φ with the growth limiter (module docstring); updates
        ``fira_prev_norm``."""
        phi = _channel_ratio(s.N, s.R, s.state["proj_right"])
        removed = s.P.project_back(s.R)
        if s.group["orthogonal_residual"] and s.P.scale != 0:
            removed = removed / s.P.scale
        residual = (s.G - removed) * phi
        return limit_norm_growth(residual, s.state, "fira_prev_norm", s.group["gamma"],
                                 norm=norm_over_rows(residual, s.shard))

    def gemm(self, s: ParamStep) -> None:
        """Twin of the readable rule (default arithmetic): GaLore's one GEMM into W, then W ← W − η_t S without
        forming S: S₀ = G − α back(R) as one GEMM, ‖S₀ ⊙ φ‖ from S₀'s channel norms, W += −η_t S₀ φ / λ in one pass
        (``addcdiv_``)."""
        s.P.add_back(s.W, s.N, alpha=-s.step_size, beta=1.0 - s.group["lr"] * s.group["weight_decay"])
        phi = _channel_ratio(s.N, s.R, s.state["proj_right"], fast=True)
        alpha = 1.0 if s.group["orthogonal_residual"] and s.P.scale != 0 else s.P.scale
        S0 = s.P.subtract_back(s.G, s.R, alpha)
        # under FSDP2 S0's rows are spread over the ranks: norms across rows are reduced (sharded.py)
        if phi.dim() == 2:  # (m, 1): one per row
            norm = norm_over_rows(phi.squeeze(1) * torch.linalg.vector_norm(S0, dim=1), s.shard)
        else:
            norm = torch.linalg.vector_norm(phi * norm_over_rows(S0, s.shard, dim=0))
        limiter = growth_limiter(norm, s.state, "fira_prev_norm", s.group["gamma"])
        divisor = 1.0 / phi if limiter is None else limiter / phi  # S = S₀ φ / λ
        s.W.addcdiv_(S0, divisor.to(s.W.dtype), value=-s.step_size)

    def merged(self, s: ParamStep) -> None:
        """Twin of the readable rule without back(R) or S₀ (default arithmetic; :meth:`_merge_applies`).

        For an orthonormal one-sided P, per channel c (row of a tall G, column of a wide one) ⟨G_c, back₁(R)_c⟩ =
        ‖R_c‖² and ‖back₁(R)_c‖ = ‖R_c‖ (back₁: back-projection without α), so S₀ = G − α' back₁(R) has
        ‖S₀_c‖² = ‖G_c‖² − (2α' − α'²)‖R_c‖²: the limiter's norm needs only ‖G_c‖. With c = φ/λ per channel,

            W ← (1 − η wd) W − η_t α back₁(N − (α'/α) R c) − η_t G c

        is GaLore's one GEMM into W (the residual's low-rank part rides along) and one pass over G, instead of a
        second GEMM for back(R) and a full-size S₀. As ‖R_c‖ ≤ ‖G_c‖, ‖S₀_c‖² ≥ (1 − α')²‖G_c‖²: taken where
        |1 − α'| ≥ 1/2 (the default α = 0.25, LLaMA-Factory's fine-tuning α = 2), where ‖S₀_c‖² ≥ ‖G_c‖²/4 and the
        subtraction cannot cancel (rounding stays that of the squared norms); otherwise (``orthogonal_residual``,
        1/2 < α < 3/2 as DCT-Fira's α = 1, a random or two-sided projector) :meth:`gemm` forms S₀."""
        alpha = s.P.scale
        alpha_res = 1.0 if s.group["orthogonal_residual"] and alpha != 0 else alpha
        right = s.state["proj_right"]
        dim = 1 if right else 0
        wide = torch.float64 if s.G.dtype == torch.float64 else torch.float32
        r_norm = channel_norms(s.R, dim, wide)  # R's channels are whole on each rank
        phi = channel_norms(s.N, dim, wide) / (r_norm + 1e-8)  # φ, as _channel_ratio
        g_sq = norm_over_rows(s.G, s.shard, dim=dim, dtype=wide).square()  # ‖G_c‖², over the ranks' rows
        s0 = (g_sq - (2 * alpha_res - alpha_res**2) * r_norm.square()).clamp_min_(0).sqrt_()  # ‖S₀_c‖
        # the norm of S₀ φ over all channels (rows: reduced over the ranks under FSDP2)
        norm = norm_over_rows(phi * s0, s.shard) if right else torch.linalg.vector_norm(phi * s0)
        limiter = growth_limiter(norm, s.state, "fira_prev_norm", s.group["gamma"])
        coef = phi if limiter is None else phi / limiter  # φ/λ per channel
        if right:
            coef = coef.unsqueeze(1)  # one per row
        low = torch.addcmul(s.N, s.R, coef, value=-alpha_res / alpha)  # N − (α'/α) R φ/λ
        s.P.add_back(s.W, low, alpha=-s.step_size, beta=1.0 - s.group["lr"] * s.group["weight_decay"])
        s.W.addcmul_(s.G, coef.to(s.W.dtype), value=-s.step_size)

    def fused_residual(self, s: ParamStep) -> torch.Tensor:
        # The kernel updates the moments itself; preview N from copies to build the residual, and express it in the
        # kernel's units: it applies η_t S with η_t = η √bc2 / bc1, where the eager path applies η S (torch-style
        # arithmetic) or η_t S (reference arithmetic).
        state, group = s.state, s.group
        preview = {"exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone(), "step": state["step"]}
        N, _ = adam_direction(s.R, preview, group)
        residual = self.residual(ParamStep(s.W, s.G, state, group, s.P, s.shard, R=s.R, N=N))
        if group["reference_adam"] or not group["correct_bias"]:
            return residual
        beta1, beta2 = group["betas"]
        bc1, bc2 = 1.0 - beta1 ** state["step"], 1.0 - beta2 ** state["step"]
        return residual * (bc1 / math.sqrt(bc2))


def _channel_ratio(N: torch.Tensor, R: torch.Tensor, right: bool, fast: bool = False) -> torch.Tensor:
    """φ = ‖N‖_c / (‖R‖_c + 1e-8) per channel of the larger side: (m, 1) when R is tall (m x r, the right side),
    (n,) when wide. The side comes from the projector, not R's shape: an FSDP2 rank may hold fewer than r rows.
    ``fast``: :func:`channel_norms`' faster rounding (default arithmetic; the reference path keeps torch's norm)."""
    dim = 1 if right else 0
    phi = channel_norms(N, dim, exact=not fast) / (channel_norms(R, dim, exact=not fast) + 1e-8)
    return phi.unsqueeze(1) if dim == 1 else phi


def limit_norm_growth(S: torch.Tensor, state: dict[str, Any], key: str, gamma: float = 1.01,
                      norm: torch.Tensor | None = None) -> torch.Tensor:
    """Fira's norm-growth limiter: S_t <- S_t / max(||S_t|| / (||S_{t-1}|| + 1e-8), gamma) * gamma.

    ``state[key]`` holds ||S_{t-1}|| after limiting (a 0-d tensor); the first call only records it. The ratio is
    compared on the device (no host sync), and the result is bitwise the references' ``max(ratio, gamma) / gamma``:
    ratio / gamma when ratio >= gamma, exactly 1 otherwise. ``norm``: ||S_t|| when S's rows are spread over FSDP2
    ranks (``sharded.norm_over_rows``); by default the vector norm of S.
    """
    limiter = growth_limiter(torch.linalg.vector_norm(S) if norm is None else norm, state, key, gamma)
    return S if limiter is None else S / limiter


def growth_limiter(norm: torch.Tensor, state: dict[str, Any], key: str, gamma: float = 1.01) -> torch.Tensor | None:
    """The divisor λ of :func:`limit_norm_growth` for an update of norm ``norm`` (None at the first call, which
    only records the norm); updates ``state[key]`` to norm / λ."""
    if key not in state:
        state[key] = norm
        return None
    ratio = norm / (state[key] + 1e-8)
    limiter = torch.where(ratio >= gamma, ratio / gamma, torch.ones_like(ratio))
    state[key] = norm / limiter
    return limiter
