"""NaturalGaLoreAdamW: inverse empirical-Fisher preconditioning of the low-rank gradient (Das, arXiv 2410.16029).

With g = vec(R_t) the current low-rank gradient and G = [g_t, g_{t-1}, ..., g_{t-s+1}] (d x s, the last s low-rank
gradients, current one included), the empirical Fisher is F = lambda I + G G^T and, by Woodbury,

    g~ = F^{-1} g = g / lambda - G (I + G^T G / lambda)^{-1} G^T g / lambda^2

computed with an s x s Cholesky solve.  g~ then goes through GaLore's Adam (moments, back-projection).

Memory: unlike the released code (which projects 2-D weights on both sides to r x r Tucker cores), we keep
GaLore's one-sided projection, so the history costs s * r * max(m, n) floats per matrix, i.e. s/2 times the
Adam state.  It is bounded by ``history_size`` (default 4: 2x the Adam state; the paper's s = 20 would be 10x)
and stored in the gradient's dtype (``history_dtype`` can lower it, e.g. torch.bfloat16).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from leantune.optim.base import LowRankOptimizer
from leantune.optim.galore_adamw import GaLoreAdamW


def woodbury_inverse_fisher(g: torch.Tensor, history: torch.Tensor, damping: float) -> torch.Tensor:
    """(damping I + H^T H)^{-1} g for flat g (d,) and history rows H (s x d), via the s x s Woodbury system."""
    dtype = torch.promote_types(g.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    H = history.to(dtype)  # s x d; G in the formula is H^T
    gf = g.to(dtype)
    s = H.shape[0]
    # the s x s system in float64: with λ small and nearly equal history rows, I + H Hᵀ/λ has a condition number
    # far beyond fp32's (Cholesky and solve fail there), while it is SPD and cheap to solve in float64
    S = torch.eye(s, dtype=torch.float64, device=H.device) + (H @ H.t()).double() / damping
    y = (H @ gf).double()
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) == 0:
        z = torch.cholesky_solve(y.unsqueeze(1), L).squeeze(1)
    else:  # SPD in exact arithmetic; least squares if rounding still broke that
        z = torch.linalg.lstsq(S, y.unsqueeze(1)).solution.squeeze(1)
    z = z.to(dtype)
    return (gf / damping - (H.t() @ z) / damping**2).to(g.dtype)


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW with the Woodbury natural-gradient transform on projected gradients.

    Extra args: ``history_size`` s (>= 1, default 4), ``damping`` lambda (1e-3 as in the paper's code),
    ``history_dtype`` (None = gradient dtype).
    """

    row_shardable = False  # its update needs statistics across all rows of R (refused under FSDP2)

    state_keys = LowRankOptimizer.state_keys + ("fisher_history", "fisher_count")

    moment_keys = ("exp_avg", "exp_avg_sq")
    fusable = False  # the fused step is not exercised on preconditioned gradients: keep the torch path

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        history_size: int = 4,
        damping: float = 1e-3,
        history_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        self._history_dtype = history_dtype
        super().__init__(params, *args, _extra_defaults={"history_size": history_size, "damping": damping}, **kwargs)

    def precondition(self, R: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        s = group["history_size"]
        flat = R.reshape(-1)
        if "fisher_history" not in state or state["fisher_history"].shape[1] != flat.numel():
            state["fisher_history"] = torch.zeros(s, flat.numel(), dtype=self._history_dtype or R.dtype, device=R.device)
            state["fisher_count"] = 0
        hist = state["fisher_history"]
        slot = state["fisher_count"] % s  # ring buffer (FIFO over the last s gradients)
        hist[slot].copy_(flat)
        state["fisher_count"] += 1
        filled = min(state["fisher_count"], s)
        return woodbury_inverse_fisher(flat, hist[:filled], group["damping"]).view_as(R)

    def _reset_moments(self, state: dict[str, Any]) -> None:
        super()._reset_moments(state)
        if "fisher_history" in state:  # old-basis gradients are meaningless in the new subspace
            state["fisher_history"].zero_()
            state["fisher_count"] = 0

    def _rotate_moments(self, state: dict[str, Any], T: torch.Tensor, right: bool) -> None:
        super()._rotate_moments(state, T, right)
        if "fisher_history" in state:
            state["fisher_history"].zero_()
            state["fisher_count"] = 0
