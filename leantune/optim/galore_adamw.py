"""GaLoreAdamW: Adam in the projected gradient space (Zhao et al., ICML 2024, arXiv 2403.03507).

For a targeted W in R^{m x n} with gradient G_t (projector P, rank r, scale alpha, see ``projectors.py``):

    R_t = project(G_t)                                  (r x max(m, n))
    M_t = b1 M_{t-1} + (1 - b1) R_t,   V_t = b2 V_{t-1} + (1 - b2) R_t^2
    N_t = M_t / (sqrt(V_t) + eps) * c_t
    W_t = W_{t-1} - eta * alpha * back(N_t)             (+ decoupled weight decay)

Two arithmetic modes:
* default (torch-style, like ``torch.optim.AdamW``): N = (M/bc1) / (sqrt(V/bc2) + eps), step size eta, decay
  W <- W (1 - eta wd) before the update, eps default 1e-8; back-projection, decay and update are one GEMM into W.
* ``reference_adam=True`` (galore-torch 1.0 / fira 1.0.2 / old HF AdamW): eps added to sqrt(V) un-corrected, the
  bias correction folded into the step size eta_t = eta sqrt(bc2)/bc1, decay W <- W - eta wd W applied *after*
  the update, eps default 1e-6.  With this flag and fp32 the results match galore-torch bitwise.

How a step is computed is one explicit rule (:meth:`GaLoreAdamW.path`) over three twins of the same formula, each
tested against the readable one (``tests/optim/test_paths.py``): ``readable`` (the formula as written; the
references' arithmetic always runs it), ``gemm`` (the default on CPU: decay, back-projection and update as one GEMM
into W) and ``fused`` (CUDA: one Triton kernel, ``leantune.kernels.optimizer_step``; switch off with
``leantune.kernels.set_enabled(None, disable=["galore_adam_step"])``).

Moments are kept when P is refreshed (as in every reference code base) unless ``moment_policy`` says otherwise.
Parameters of groups without ``rank`` get the same Adam without projection.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from leantune.kernels.dispatch import kernel_for
from leantune.optim.base import LowRankOptimizer
from leantune.optim.step import ParamStep


def resolve_eps(eps: float | None, reference_adam: bool) -> float:
    if eps is None:
        return 1e-6 if reference_adam else 1e-8
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def check_betas(betas: tuple[float, float]) -> None:
    for b in betas:
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Adam betas must be in [0, 1), got {betas}")


def adam_direction(R: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Update the moments with R (``state['step']`` already incremented) and return (N, step_size).

    The first moment is b1 m + (1 − b1) R as the references write it (``reference_adam``), or one ``lerp_`` as
    torch's AdamW computes it (same value up to rounding, one pass instead of two)."""
    beta1, beta2 = group["betas"]
    if group["reference_adam"]:
        state["exp_avg"].mul_(beta1).add_(R, alpha=1.0 - beta1)
    else:
        state["exp_avg"].lerp_(R, 1.0 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
    return adam_normalize(state["exp_avg"], state["exp_avg_sq"], state["step"], group)


def adam_normalize(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   group: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(N, step size) from the moments at ``step`` (1-based): N = m / (√v + ε) with the bias correction in the step
    size η √bc2 / bc1 (``reference_adam``), or the paper's N = m̂ / (√v̂ + ε) = (m / bc1) / (√(v / bc2) + ε) with step
    size η, as torch's AdamW computes it. Rules that scale something by ‖N‖ (Fira, APOLLO) thus see the
    bias-corrected direction in the default mode."""
    beta1, beta2 = group["betas"]
    bc1 = 1.0 - beta1**step if group["correct_bias"] else 1.0
    bc2 = 1.0 - beta2**step if group["correct_bias"] else 1.0
    if group["reference_adam"]:
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(bc2) / bc1
    else:
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(group["eps"]).mul_(bc1)
        step_size = group["lr"]
    return torch.div(exp_avg, denom, out=denom), step_size


def init_moments(R: torch.Tensor, state: dict[str, Any]) -> None:
    """Zero Adam moments shaped (and typed) like R, the first time."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(R)
        state["exp_avg_sq"] = torch.zeros_like(R)


def apply_update(p: torch.Tensor, update: torch.Tensor, step_size: float, group: dict[str, Any]) -> None:
    """p -= step_size * update, with decoupled weight decay before (torch) or after (reference) it."""
    wd = group["weight_decay"]
    if group["reference_adam"]:
        p.add_(update, alpha=-step_size)
        if wd > 0.0:
            p.add_(p, alpha=-group["lr"] * wd)
    else:
        if wd > 0.0:
            p.mul_(1.0 - group["lr"] * wd)
        p.add_(update, alpha=-step_size)


class GaLoreAdamW(LowRankOptimizer):
    """AdamW whose ``rank`` groups keep their moments in a rank-r gradient subspace.

    Args:
        params: parameters or param groups (see ``make_param_groups``); groups with ``rank`` are projected.
        lr, betas, eps, weight_decay, correct_bias: Adam hyper-parameters (eps None -> 1e-8, or 1e-6 with
            ``reference_adam``).
        reference_adam: reproduce galore-torch / fira arithmetic (see module docstring).
        update_proj_gap, scale, projector, moment_policy, max_grad_norm_per_param: defaults for low-rank groups.
        layerwise: update each parameter inside backward and free its gradient (see ``layerwise.py``).
        accumulation_steps: micro-batches per optimizer step (layerwise only).
        shard_replicated: under FSDP2, also divide what is otherwise whole on every rank (a right-side P, a left
            side's r × n moments) for one all-gather of P per right-side matrix per step (``sharded.py``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float | None = None,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        reference_adam: bool = False,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        projector: str = "svd",
        moment_policy: str = "keep",
        max_grad_norm_per_param: float | None = None,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        shard_replicated: bool = False,
        _extra_defaults: dict[str, Any] | None = None,
    ) -> None:
        check_betas(betas)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": resolve_eps(eps, reference_adam),
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "reference_adam": reference_adam,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "projector": projector,
            "moment_policy": moment_policy,
            "max_grad_norm_per_param": max_grad_norm_per_param,
            "shard_replicated": bool(shard_replicated),
            **(_extra_defaults or {}),  # subclasses' own hyper-parameters (Fira's gamma, ...), merged along the MRO
        }
        super().__init__(params, defaults, layerwise=layerwise, accumulation_steps=accumulation_steps)

    row_shardable = True  # FSDP2: projection, moments and update are row-local (sharded.py)
    #: FSDP2 ``shard_replicated``: Adam is element-wise on R, so R's columns can be divided (sharded.py)
    replicated_shardable = True

    #: whether the fused Triton kernel may implement "moments + direction + back-projection + update" for this class
    fusable = True

    # ---- the update rule --------------------------------------------------------------------------------------
    def update(self, s: ParamStep) -> None:
        """One step for ``s.W`` in the paper's order (module docstring): R = project(G), then the moments, the
        direction and the weight update, computed by the path :meth:`path` picks (all compute the same formula)."""
        s.R = s.G if s.P is None else self.precondition(self.project(s.P, s.G, shard=s.shard), s.state, s.group)
        s.state["step"] += 1
        path = self.path(s)
        if path == "fused":
            init_moments(s.R, s.state)
            return self.fused(s)
        s.N, s.step_size = self.direction(s.R, s.state, s.group, s.shard)  # m, v ← Adam of R; N = m̂ / (√v̂ + ε)
        if s.P is not None:
            s.N = s.P.complete(s.N)  # FSDP2 with shard_replicated: the columns the other ranks computed
        getattr(self, path)(s)

    def readable(self, s: ParamStep) -> None:
        """The rule's last line as written: W ← W − η_t (α back(N) + S), decoupled decay before it (torch's AdamW)
        or after it (``reference_adam``: galore-torch's order, bitwise). S = :meth:`residual` (none for GaLore)."""
        if s.P is None:
            return apply_update(s.W, s.N, s.step_size, s.group)
        S = self.residual(s)
        update = s.P.project_back(s.N)
        apply_update(s.W, update if S is None else update + S, s.step_size, s.group)

    def gemm(self, s: ParamStep) -> None:
        """Fast twin of :meth:`readable` (default arithmetic): decay, back-projection and update as one GEMM into W
        (``addmm``: no full-size temporary; rounds differently from forming α back(N)), then W ← W − η S."""
        s.P.add_back(s.W, s.N, alpha=-s.step_size, beta=1.0 - s.group["lr"] * s.group["weight_decay"])
        S = self.residual(s)
        if S is not None:
            s.W.add_(S, alpha=-s.step_size)

    def fused(self, s: ParamStep) -> None:
        """Fast twin on CUDA: "moments + direction + back-projection + update" as one pass over W
        (``leantune.kernels.optimizer_step``, fp32 arithmetic; R, the down-projection, stays a library GEMM)."""
        reference = s.group["reference_adam"]
        kernel_for("galore_adam_step", s.W, s.G)(
            s.W, s.G, s.P.matrix(), s.state["exp_avg"], s.state["exp_avg_sq"],
            step=s.state["step"], lr=s.group["lr"], betas=s.group["betas"], eps=s.group["eps"],
            weight_decay=s.group["weight_decay"], scale=s.P.scale,
            side="right" if s.state["proj_right"] else "left", correct_bias=s.group["correct_bias"],
            eps_mode="hf" if reference else "torch", weight_decay_mode="after" if reference else "before",
            residual=self.fused_residual(s), projected=s.R,
        )  # fmt: skip

    #: the paths :meth:`path` may pick; each computes :meth:`readable`'s formula (``tests/optim/test_paths.py``)
    paths: tuple[str, ...] = ("readable", "gemm", "fused")

    def path(self, s: ParamStep) -> str:
        """THE rule that picks how this step is computed: the readable rule for full-rank parameters; the fused
        kernel where one is registered for these tensors (CUDA + Triton, a contiguous W, a one-sided projector; it
        has both arithmetic modes); else the readable rule for the references' arithmetic (``reference_adam``:
        bitwise parity with galore-torch / fira) and the GEMM twin for the default one. ``force_path`` (tests,
        benchmarks) overrides it."""
        if (forced := self.forced_path(s)) is not None:
            return forced
        if s.P is None:
            return "readable"
        if self.fusable and s.P.one_sided and s.W.is_contiguous() and getattr(s.P, "columns", None) is None and \
                kernel_for("galore_adam_step", s.W, s.G) is not None:
            return "fused"
        return "readable" if s.group["reference_adam"] else "gemm"

    # ---- hooks of the family (defaults: GaLore's) ---------------------------------------------------------------
    def direction(self, R: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                  shard: Any = None) -> tuple[torch.Tensor, float]:
        """Adam on R: update the moments (created at the first step) and return ``(N, step size)``
        (8-bit optimizers keep the moments as bitsandbytes codes instead)."""
        init_moments(R, state)
        return adam_direction(R, state, group)

    def precondition(self, R: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """Transform of the projected gradient before Adam (identity; Natural GaLore: F⁻¹ R)."""
        return R

    def residual(self, s: ParamStep) -> torch.Tensor | None:
        """Full-rank term S added to the back-projected update (None; Fira: its scaled, limited residual)."""
        return None

    def fused_residual(self, s: ParamStep) -> torch.Tensor | None:
        """:meth:`residual` in the kernel's units (W ← W − η_t (α back(N) + S)), computed before the kernel updates
        the moments; None when there is none."""
        return None
