"""CondaAdamW: Column-Normalized Adam (Wang et al., arXiv 2509.24218).

Adam whose second moment lives in the orthogonal basis of the first moment's singular vectors. For W ∈ R^{m×n}
with gradient G, refresh period T, step t (1-based):

    M_t = β1 M_{t−1} + (1 − β1) G_t                      first moment, full size, original basis
    Q   = Vᵀ of svd(M_t) (m ≥ n, n×n)  or  U (m < n, m×m)   full basis, recomputed every T steps (t = 1, T+1, …)
    Ĝ   = G Qᵀ,  M̂ = M Qᵀ   (m ≥ n)   or   Qᵀ G,  Qᵀ M   (m < n)
    V_t = β2 V_{t−1} + (1 − β2) Ĝ²                       second moment, in the rotated basis (kept across refreshes)
    N   = M̂ / (√V_t + ε)   (bias correction as GaLoreAdamW: folded into η_t with ``reference_adam``, else torch's)
    W  ← W − η_t · scale · N Q  (m ≥ n)  or  Q N  (m < n)    (+ decoupled weight decay)

So each column (row) of the rotated update is normalised by its own second moment, hence "column-normalized". The
state is 2mn + min(m, n)² elements: more than AdamW; Conda's claim is convergence speed (2–2.5× fewer steps than
AdamW on LLaMA pretraining), not memory. The first step is −η·scale·sign(U)·Vᵀ (m ≥ n) for G = U Σ Vᵀ.

Projected groups are those with a ``rank`` key whose value is None (``make_param_groups(rank=None)``); groups in
the official code's spelling (``update_proj_gap`` present, no ``rank``) are read the same way. Others get AdamW.
Defaults: T 2000, scale 1 (the official LLaMA scripts use scale 0.25, lr 0.01, betas (0.9, 0.99)), eps 1e-8.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from leantune.optim.base import LowRankOptimizer
from leantune.optim.galore_adamw import (
    GaLoreAdamW,
    adam_normalize,
    apply_update,
    check_betas,
    init_moments,
    resolve_eps,
)
from leantune.optim.step import ParamStep
from leantune.optim.svd import thin_svd


class CondaAdamW(GaLoreAdamW):
    """Conda (module docstring). Args as GaLoreAdamW's Adam ones, plus ``update_proj_gap`` (T) and ``scale``."""

    row_shardable = False  # its update needs statistics across all rows of R (refused under FSDP2)

    state_keys = ("step", "exp_avg", "exp_avg_sq", "conda_basis")
    low_rank_defaults = {"update_proj_gap": 2000, "scale": 1.0, "max_grad_norm_per_param": None}
    fusable = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float | None = 1e-8, weight_decay: float = 0.0, correct_bias: bool = True,
                 reference_adam: bool = False, update_proj_gap: int = 2000, scale: float = 1.0,
                 max_grad_norm_per_param: float | None = None, layerwise: bool = False,
                 accumulation_steps: int = 1) -> None:
        check_betas(betas)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": resolve_eps(eps, reference_adam),
                    "weight_decay": weight_decay, "correct_bias": correct_bias, "reference_adam": reference_adam,
                    "update_proj_gap": update_proj_gap, "scale": scale,
                    "max_grad_norm_per_param": max_grad_norm_per_param}
        LowRankOptimizer.__init__(self, params, defaults, layerwise=layerwise, accumulation_steps=accumulation_steps)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "update_proj_gap" in param_group and "rank" not in param_group:
            param_group = {**param_group, "rank": None}  # the official code marks projected groups this way
        super().add_param_group(param_group)

    def _validate_low_rank(self, index: int, group: dict[str, Any]) -> None:
        if group["rank"] is not None:
            raise ValueError(f"param group {index}: Conda rotates into the full singular basis of its first moment and "
                             f"has no rank; got rank={group['rank']!r} (use rank=None, or a GaLore-type optimizer for a "
                             "low-rank subspace)")
        if not isinstance(group["update_proj_gap"], int) or group["update_proj_gap"] < 1:
            raise ValueError(f"param group {index}: update_proj_gap must be an integer >= 1")
        self._labelled(index, group)  # only matrices

    def update(self, s: ParamStep) -> None:
        p, grad, state, group = s.W, s.G, s.state, s.group
        if "rank" not in group or p.ndim != 2:
            return super().update(s)  # plain AdamW
        init_moments(grad, state)
        beta1, beta2 = group["betas"]
        M, V = state["exp_avg"], state["exp_avg_sq"]
        M.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # M_t in the original basis
        tall = p.shape[0] >= p.shape[1]
        if "conda_basis" not in state or state["step"] % group["update_proj_gap"] == 0:
            self._refresh_basis(M, state, tall)
        Q = state["conda_basis"]
        G_hat, M_hat = (grad @ Q.t(), M @ Q.t()) if tall else (Q.t() @ grad, Q.t() @ M)
        V.mul_(beta2).addcmul_(G_hat, G_hat, value=1.0 - beta2)
        state["step"] += 1
        N, step_size = adam_normalize(M_hat, V, state["step"], group)
        update = (N @ Q) if tall else (Q @ N)
        apply_update(p, update.mul_(group["scale"]), step_size, group)

    @staticmethod
    def _refresh_basis(M: torch.Tensor, state: dict[str, Any], tall: bool) -> None:
        """Q from the SVD of the updated first moment, in fp32 whatever the dtype (as the official code: directions of
        a rank-deficient M are otherwise decided by rounding, and Conda's first step gives them full size), cast back; on failure the previous Q is kept, or
        the identity (plain Adam) the first time, with a warning."""
        try:
            U, _, Vh = thin_svd(M.float())  # Conda is sign-invariant (N Q): any valid signs give the same step
            Q = (Vh if tall else U).to(M.dtype)
            if not bool(torch.isfinite(Q).all()):
                raise RuntimeError("non-finite singular vectors")
        except RuntimeError as err:
            kept = "keeping the previous basis" if "conda_basis" in state else "using the identity (Adam) basis"
            warnings.warn(f"CondaAdamW: SVD of the first moment {tuple(M.shape)} failed ({err}); {kept}.",
                          RuntimeWarning, stacklevel=4)
            if "conda_basis" in state:
                return
            Q = torch.eye(min(M.shape), dtype=M.dtype, device=M.device)
        state["conda_basis"] = Q
