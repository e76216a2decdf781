"""GaLoreAdafactor: Adafactor (Shazeer & Stern 2018) run on the GaLore-projected gradient.

For the projected gradient R (or the raw gradient of a non-targeted parameter), step t:

    rho_t  = min(1e-2 (or 1e-6 t with warmup_init), 1/sqrt(t)) if relative_step else lr
    eta_t  = max(eps2, RMS(W)) * rho_t if scale_parameter else rho_t
    beta2t = 1 - t^decay_rate
    U      = R^2 + eps1
    2-D:   r_t = beta2t r + (1-beta2t) mean_cols(U),  c_t = beta2t c + (1-beta2t) mean_rows(U),
           V^ = (r_t / mean(r_t)) c_t^T   (factored second moment: m + n floats instead of m n)
    other: v_t = beta2t v + (1-beta2t) U, V^ = v_t
    D      = R / sqrt(V^);   D <- D / max(1, RMS(D) / d)  (update clipping, d = clip_threshold);   D <- eta_t D
    if beta1: M = beta1 M + (1-beta1) D; D = M
    W     <- W - eta_t wd W - alpha back(D)

This is the HF ``Adafactor`` arithmetic that galore-torch wraps. The last line as written (the ``readable`` path:
form alpha back(D) in full, decay, subtract — galore-torch's order, bit for bit with ``reference_order=True``) has a
twin, ``gemm``, the default: one GEMM into W (``addmm_``, decay as its beta), which saves a full-size pass and rounds
differently (``GaLoreAdafactor.path`` picks; ``tests/optim/test_paths.py`` checks the two agree).  Moments cannot be rotated (they are factored); ``moment_policy`` "keep" or
"reset".
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from leantune.optim.base import LowRankOptimizer
from leantune.optim.step import ParamStep


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


class GaLoreAdafactor(LowRankOptimizer):
    """Adafactor with GaLore projection for ``rank`` groups (defaults follow GaLore's pretraining scripts:
    ``relative_step=False, scale_parameter=False``; lr 1e-2)."""

    state_keys = LowRankOptimizer.state_keys + ("exp_avg_sq_row", "exp_avg_sq_col", "RMS")

    moment_keys = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
    supports_fp16 = True  # computes in fp32 and keeps fp32 state
    supports_rotate = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = 1e-2,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = False,
        relative_step: bool = False,
        warmup_init: bool = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        projector: str = "svd",
        moment_policy: str = "keep",
        max_grad_norm_per_param: float | None = None,
        reference_order: bool = False,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError("Adafactor: pass lr=None with relative_step=True (the step size is then 1/sqrt(t)).")
        if lr is None and not relative_step:
            raise ValueError("Adafactor: lr is required when relative_step=False.")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True requires relative_step=True.")
        defaults = {
            "lr": lr if lr is not None else 0.0,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "projector": projector,
            "moment_policy": moment_policy,
            "max_grad_norm_per_param": max_grad_norm_per_param,
            "reference_order": reference_order,
        }
        super().__init__(params, defaults, layerwise=layerwise, accumulation_steps=accumulation_steps)

    @staticmethod
    def _step_size(group: dict[str, Any], step: int, rms_param: torch.Tensor) -> float | torch.Tensor:
        rho = group["lr"]
        if group["relative_step"]:
            floor = 1e-6 * step if group["warmup_init"] else 1e-2
            rho = min(floor, 1.0 / math.sqrt(step))
        scale = max(group["eps"][1], rms_param) if group["scale_parameter"] else 1.0
        return float(scale * rho)

    def _reset_moments(self, state: dict[str, Any]) -> None:
        # zeroed factored moments would divide by zero; drop them so the next step re-initializes them
        for key in self.moment_keys + ("RMS",):
            state.pop(key, None)

    def working_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Adafactor runs in fp32 (as transformers' and galore-torch's): the projector is refreshed from, and
        projects, the fp32 gradient."""
        return grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad

    #: the readable rule (back-project, decay, subtract: galore-torch's order with ``reference_order``) and its twin
    paths = ("readable", "gemm")

    def path(self, s: ParamStep) -> str:
        """The readable rule for full-rank parameters and ``reference_order``, else the one-GEMM twin."""
        if (forced := self.forced_path(s)) is not None:
            return forced
        return "readable" if s.P is None or s.group["reference_order"] else "gemm"

    def update(self, s: ParamStep) -> None:
        p, grad, state, group, projector = s.W, s.G, s.state, s.group, s.P
        R = self.project(projector, grad, shard=s.shard) if projector is not None else grad
        factored = R.ndim >= 2
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(R)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(R.shape[:-1], dtype=R.dtype, device=R.device)
                state["exp_avg_sq_col"] = torch.zeros(R.shape[:-2] + R.shape[-1:], dtype=R.dtype, device=R.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(R)
        p32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        state["step"] += 1
        if group["scale_parameter"]:  # RMS(W) is a full pass over W: only where η_t uses it (HF computes it always)
            state["RMS"] = _rms(p32)
        eta = self._step_size(group, state["step"], state.get("RMS"))
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        sq = R**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(R)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(R)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(eta)
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = state["exp_avg"]
        if self.path(s) == "gemm":  # W ← (1 − η_t wd) W − α back(D), one GEMM
            projector.add_back(p32, update, alpha=-1.0, beta=1.0 - group["weight_decay"] * eta)
        else:  # readable: back-project, decay, subtract (galore-torch's order)
            if projector is not None:
                update = projector.project_back(update)
            if group["weight_decay"] != 0:
                p32.add_(p32, alpha=-group["weight_decay"] * eta)
            p32.sub_(update)  # = add_(-update) bit for bit, without the negated copy
        if p32 is not p:
            p.copy_(p32)
