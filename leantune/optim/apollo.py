"""APOLLO and APOLLO-Mini: AdamW's scaling estimated in a random low-rank space (Zhu et al., MLSys 2025,
arXiv 2412.05270).

AdamW's element-wise step m̂/(√v̂ + ε) is coarsened to one scale per channel (APOLLO) or one per tensor
(APOLLO-Mini), estimated by Adam run on a random projection R of the gradient; the update is the *raw* gradient
times that scale. For W ∈ R^{m×n} with gradient G, rank r, random P (``projectors.RandomProjector``, refreshed every
T steps):

    R_t = G Pᵀ (m ≥ n, P: r×n)  or  Pᵀ G (m < n, P: m×r)           (max(m, n) × r, or its transpose)
    M_t = β1 M + (1 − β1) R_t,  V_t = β2 V + (1 − β2) R_t²,  N_t = M_t / (√V_t + ε)   (Adam on R, see galore_adamw)
    s   = ‖N_t‖_c / (‖R_t‖_c + 1e-8)    per channel c of the larger side ("channel"), or ‖N‖_F/(‖R‖_F + 1e-8) ("tensor")
    S   = α · limit(G ⊙ s)              α = √scale (the paper's α; apollo-torch's ``scale`` is α²), applied before the
                                        limiter with ``scale_front``; ``limit`` is Fira's norm-growth limiter (γ = 1.01,
                                        off with ``disable_nl``)
    W  ← W − η_t S                      (+ decoupled weight decay, as in GaLoreAdamW)

Nothing is projected back. The state per matrix is M and V (2·r·max(m, n)), the limiter's previous norm and the
projection seed: P is regenerated from its seed at every step instead of being stored (the paper's accounting),
which keeps bitwise parity with apollo-torch 1.0.3 (``reference_adam=True``, fp32). :meth:`APOLLOAdamW.readable`
forms S as written (and runs the reference arithmetic); its twin :meth:`APOLLOAdamW.scaled_pass` (the default) never
forms it: ‖G ⊙ s‖ from G's channel norms, then one pass into W (``tests/optim/test_paths.py``).

APOLLO-Mini is rank 1, ``scale_type="tensor"``, scale 128 (α = √128). ``projector="svd"`` gives the paper's
"APOLLO w/ SVD" row. apollo-torch's param-group keys are accepted as they are (``proj`` for ``projector``,
``scale_type``, ``proj_type="std"``, ``scale_front``/``disable_nl`` also per group).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from leantune._utils import channel_norms
from leantune.optim.base import LowRankOptimizer
from leantune.optim.fira import growth_limiter, limit_norm_growth
from leantune.optim.galore_adamw import GaLoreAdamW, apply_update
from leantune.optim.step import ParamStep

SCALE_TYPES = ("channel", "tensor")


def scaling_factor(N: torch.Tensor, R: torch.Tensor, scale_type: str, fast: bool = False) -> torch.Tensor:
    """s = ‖N‖/(‖R‖ + 1e-8) per channel of the larger side (a column vector when R is tall) or for the whole tensor.
    ``fast``: channel norms by :func:`channel_norms` (default arithmetic; apollo-torch's order keeps torch's)."""
    if scale_type == "tensor":
        return torch.linalg.vector_norm(N) / (torch.linalg.vector_norm(R) + 1e-8)
    dim = 0 if R.shape[0] < R.shape[1] else 1  # the r-long side: reduce over it
    s = channel_norms(N, dim, exact=not fast) / (channel_norms(R, dim, exact=not fast) + 1e-8)
    return s.unsqueeze(1) if dim == 1 else s


class APOLLOAdamW(GaLoreAdamW):
    """APOLLO (module docstring). ``rank`` groups get the APOLLO update, other parameters plain AdamW.

    Args (besides GaLoreAdamW's): ``scale_type`` ("channel" | "tensor"), ``scale_front`` (apply √scale before the
    limiter), ``disable_nl`` (no norm-growth limiter). Defaults: random projector, scale 1 (APOLLO's recipe).
    """

    row_shardable = False  # its update needs statistics across all rows of R (refused under FSDP2)

    state_keys = LowRankOptimizer.state_keys + ("limiter_norm",)
    group_aliases = {"proj": "projector"}  # apollo-torch's key
    fusable = False

    def __init__(self, params: Iterable[Any], *args: Any, scale_type: str = "channel", scale_front: bool = False,
                 disable_nl: bool = False, projector: str = "random", scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(params, *args, projector=projector, scale=scale, _extra_defaults={
            "scale_type": scale_type, "scale_front": scale_front, "disable_nl": disable_nl}, **kwargs)

    def _validate_group(self, index: int, group: dict[str, Any]) -> None:
        super()._validate_group(index, group)
        if "rank" in group and group["projector"] == "svd2":
            raise ValueError(f"param group {index}: APOLLO scales channels of a one-sided projection; projector "
                             "'svd2' (two-sided) does not have them: use 'random' (APOLLO) or 'svd' (APOLLO w/ SVD)")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"param group {index}: scale_type={group['scale_type']!r}, expected one of {SCALE_TYPES}")
        if group["scale"] < 0:
            raise ValueError(f"param group {index}: scale={group['scale']} must be >= 0 (the step is multiplied by its "
                             "square root)")

    #: the readable rule (forms S as written; apollo-torch's op order, bitwise with ``reference_adam``) and its twin
    paths = ("readable", "scaled_pass")

    def path(self, s: ParamStep) -> str:
        """The readable rule for full-rank parameters and the reference arithmetic, else the one-pass twin."""
        if (forced := self.forced_path(s)) is not None:
            return forced
        return "readable" if s.P is None or s.group["reference_adam"] else "scaled_pass"

    def update(self, s: ParamStep) -> None:
        if s.P is None:
            return super().update(s)  # plain AdamW
        s.R = self.project(s.P, s.G, shard=s.shard)
        s.state["step"] += 1
        s.N, s.step_size = self.direction(s.R, s.state, s.group, s.shard)  # Adam on R: N = M / (√V + ε)
        getattr(self, self.path(s))(s)

    def readable(self, s: ParamStep) -> None:
        """S = α · limit(G ⊙ s) formed as written (module docstring), then W ← W − η_t S with decoupled decay."""
        if s.P is None:
            return super().readable(s)
        group = s.group
        scale = scaling_factor(s.N, s.R, group["scale_type"])
        alpha = math.sqrt(group["scale"])
        S = s.G * scale  # the raw gradient, rescaled
        if group["scale_front"]:
            S.mul_(alpha)
        if not group["disable_nl"]:
            S = limit_norm_growth(S, s.state, "limiter_norm")
        if not group["scale_front"]:
            S.mul_(alpha)
        apply_update(s.W, S, s.step_size, group)

    def scaled_pass(self, s: ParamStep) -> None:
        """Twin of :meth:`readable` (default arithmetic) without forming S: ‖G ⊙ s‖ from G's channel norms, then one
        fused pass into W (``addcmul_``)."""
        group = s.group
        scale = scaling_factor(s.N, s.R, group["scale_type"], fast=True)
        alpha = math.sqrt(group["scale"])
        factor = scale * alpha
        if not group["disable_nl"]:
            limiter = growth_limiter(self._scaled_norm(s.G, scale) * (alpha if group["scale_front"] else 1.0), s.state,
                                     "limiter_norm")
            if limiter is not None:
                factor = factor / limiter
        if group["weight_decay"] > 0.0:
            s.W.mul_(1.0 - group["lr"] * group["weight_decay"])
        s.W.addcmul_(s.G, factor.to(s.W.dtype), value=-s.step_size)

    @staticmethod
    def _scaled_norm(G: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """‖G ⊙ s‖_F for s a scalar, a column (one per row) or a row vector (one per column), from G's norms."""
        if s.dim() == 0:
            return s * torch.linalg.vector_norm(G)
        if s.dim() == 2:  # (m, 1): one per row
            return torch.linalg.vector_norm(s.squeeze(1) * torch.linalg.vector_norm(G, dim=1))
        return torch.linalg.vector_norm(s * channel_norms(G, 0))


class APOLLOMini(APOLLOAdamW):
    """APOLLO-Mini: rank 1, one scale per tensor, α = √128 (``scale=128``)."""

    def __init__(self, params: Iterable[Any], *args: Any, scale_type: str = "tensor", scale: float = 128.0,
                 **kwargs: Any) -> None:
        super().__init__(params, *args, scale_type=scale_type, scale=scale, **kwargs)
