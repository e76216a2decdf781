"""SVD-free subspace selection with a shared DCT basis (Modoranu et al., arXiv 2505.17967).

Basis: the orthonormal DCT-II matrix C in R^{d x d}, C[k, j] = sqrt(2/d) cos(pi k (2j+1) / (2d)), row 0 scaled by
sqrt(1/2).  We use Q = C^T, whose columns are the cosine basis vectors.  Q is built once per (size, device, dtype)
and shared by every layer of that size.

Selection for G in R^{m x n}:
* right side (m >= n):  S = G Q (m x n), score_j = ||S[:, j]||_p, idx = top-r(score);  R = S[:, idx] = G Q[:, idx]
* left side  (m <  n):  S = Q^T G (m x n), score_i = ||S[i, :]||_p, idx = top-r(score);  R = S[idx, :] = Q[:, idx]^T G
Back-projection: alpha * N Q[:, idx]^T (right) or alpha * Q[:, idx] N (left).  Only the r int32 indices are stored
per layer; p = 1 (the reference's ``ell_norm=1``) by default.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from leantune.optim.projectors import Projector

_BASES: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def dct_matrix(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal Q = C^T (columns = DCT-II basis vectors), computed in float64 then cast.

    Q is the transposed view of a row-major C: a basis vector is a contiguous row of C, so gathering the r selected
    ones (:meth:`DCTProjector.matrix`, every step) copies r rows instead of picking r strided columns."""
    k = torch.arange(d, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(d, dtype=torch.float64).unsqueeze(0)
    C = math.sqrt(2.0 / d) * torch.cos(math.pi * k * (2 * j + 1) / (2 * d))
    C[0] *= math.sqrt(0.5)
    return C.to(device=device, dtype=dtype).contiguous().t()


def shared_dct_basis(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One basis per (size, device, dtype), shared by all layers and all optimizers in the process."""
    key = (d, str(device), dtype)
    if key not in _BASES:
        _BASES[key] = dct_matrix(d, dtype=dtype, device=device)
    return _BASES[key]


class DCTProjector(Projector):
    """Top-r DCT columns by the p-norm of the gradient's coefficients; stores ``proj_indices`` (int32) only."""

    kind = "dct"
    state_keys = ("proj_right", "proj_indices", "proj_dim", "proj_dtype_ref")

    def __init__(self, state: dict[str, Any], rank: int, update_proj_gap: int, scale: float, norm_ord: int = 1):
        super().__init__(state, rank, update_proj_gap, scale)
        self.norm_ord = norm_ord

    @property
    def initialized(self) -> bool:
        return "proj_indices" in self.state

    def basis(self) -> torch.Tensor:
        return shared_dct_basis(self.state["proj_dim"], self.state["proj_dtype_ref"].dtype, self.state["proj_indices"].device)

    def matrix(self) -> torch.Tensor:
        if getattr(self, "_P", None) is None:  # a projector object lives for one step: gather once per step
            rows = self.basis().t().index_select(0, self.state["proj_indices"].long())  # r x d, C's rows
            self._P = rows if self.state["proj_right"] else rows.t()
        return self._P

    def scores(self, grad: torch.Tensor) -> torch.Tensor:
        right = self.is_right(grad.shape)
        d = grad.shape[1] if right else grad.shape[0]
        Q = shared_dct_basis(d, grad.dtype, grad.device)
        if right:
            return torch.linalg.vector_norm(grad @ Q, ord=self.norm_ord, dim=0)
        return torch.linalg.vector_norm(Q.t() @ grad, ord=self.norm_ord, dim=1)

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        self._P = None
        right = self.is_right(grad.shape)
        self.state["proj_right"] = right
        if not bool(torch.isfinite(grad).all()):
            return self._accept(grad, None, "non-finite gradient")
        d = grad.shape[1] if right else grad.shape[0]
        score = self.scores(grad)
        idx = torch.topk(score, k=min(self.rank, d), sorted=False).indices
        self.state["proj_indices"] = idx.to(torch.int32)
        self.state["proj_dim"] = d
        # a 0-element tensor remembers the basis dtype without storing anything (weights_only-safe)
        self.state["proj_dtype_ref"] = torch.empty(0, dtype=grad.dtype, device=grad.device)
        return True

    def _accept(self, grad, new, reason):  # DCT never stores a matrix; only the warning path is shared
        if new is None:
            return super()._accept(grad, None, reason)
        raise AssertionError("DCTProjector stores indices, not matrices")
