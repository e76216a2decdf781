"""Momentum reset and weight refactorization (Glentis et al., arXiv 2505.22922), for every leantune optimizer.

Every K optimizer steps (a *cycle*):

* **weight refactorization** (``refactorize=True``): each trainable low-rank pair ΔW = s·B A (peft LoRA, ALLoRA) is
  rebalanced without changing the product:

      U Σ Vᵀ = svd(B A)   (thin, in fp32/fp64),   B ← U_r Σ_r^{1/2},   A ← Σ_r^{1/2} V_rᵀ

  so BᵀB = A Aᵀ = Σ_r and ‖B‖_F² = ‖A‖_F² = Σσ_i. A pair whose B A has numerical rank below r (e.g. LoRA's B = 0
  before training) is left as it is: balancing it would zero directions that could then never train again.
* **momentum reset**: the optimizer state is dropped as if the optimizer were rebuilt (``reset_moments="all"``, the
  reference code: moments, step counters and projections, so bias correction restarts), or only the first moments
  are zeroed (``"first"``);
* **LR recovery**: for the next ``recovery_steps`` steps the learning rate is multiplied by
  0.001 + 0.999·j/recovery_steps (j = 0, 1, … steps since the reset). The reference ramps linearly from 0.001× to
  the schedule's value ``recovery_steps`` later; ramping the schedule's current value is the same up to the
  schedule's change over those few steps, and composes with any Trainer scheduler.

The cycle counter lives in the param groups (``cycle_step``), so it is saved and restored with the optimizer.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from leantune._utils import upcast
from leantune.optim.svd import canonical_pairs, thin_svd

RESET_MOMENTS = ("all", "first")
#: state keys holding a first moment (Adam's m, 8-bit codes and their block scales, GradNormLoRP's magnitude m)
FIRST_MOMENT_KEYS = ("exp_avg", "state1", "absmax1", "wn_g_exp_avg")
RECOVERY_START = 1e-3


def low_rank_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, B, A) for every trainable factor pair ΔW ∝ B A in ``model``: peft LoRA layers and the adapter layers
    whose ``factor_pairs()`` hook names some (leantune's ALLoRA)."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter, a in module.lora_A.items():
                b = module.lora_B[adapter]
                if isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.weight.requires_grad and \
                        b.weight.requires_grad:
                    pairs.append((f"{name}.{adapter}", b.weight, a.weight))
        elif callable(getattr(module, "factor_pairs", None)):
            pairs += [(f"{name}.{adapter}", b, a) for adapter, b, a in module.factor_pairs()]
    return pairs


@torch.no_grad()
def refactorize(B: torch.Tensor, A: torch.Tensor, rtol: float = 1e-6) -> bool:
    """Rebalance B (m x r), A (r x n) in place to U_r Σ_r^{1/2}, Σ_r^{1/2} V_rᵀ of B A (module docstring). Returns
    False (and changes nothing) when B A has fewer than r singular values above ``rtol``·σ_max."""
    r = A.shape[0]
    W = upcast(B) @ upcast(A)
    U, S, Vh = thin_svd(W)
    if S.numel() < r or S[0] == 0 or bool(S[r - 1] <= rtol * S[0]):
        return False
    U, Vh = canonical_pairs(U, Vh, r)  # B and A themselves (and so their optimizer's steps) do not depend on LAPACK
    root = S[:r].sqrt()
    B.copy_(U * root)
    A.copy_(root[:, None] * Vh)
    return True


class Restarts:
    """The cycle logic of one optimizer (module docstring); built by ``LowRankOptimizer.enable_restarts``."""

    def __init__(self, every: int, moments: str = "all", recovery_steps: int = 10,
                 pairs: list[tuple[str, nn.Parameter, nn.Parameter]] | None = None) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"reset_every must be an integer >= 1, got {every!r}")
        if moments not in RESET_MOMENTS:
            raise ValueError(f"reset_moments={moments!r}, expected one of {RESET_MOMENTS}")
        if not isinstance(recovery_steps, int) or recovery_steps < 0:
            raise ValueError(f"recovery_steps must be an integer >= 0, got {recovery_steps!r}")
        self.every, self.moments, self.recovery_steps = every, moments, recovery_steps
        self.pairs = list(pairs or [])
        self.skipped: list[str] = []  # pairs left unbalanced at the last cycle (rank-deficient)

    def lr_factor(self, group: dict[str, Any]) -> float:
        """The recovery multiplier for the step about to run."""
        done = group.get("cycle_step", 0)
        since = done % self.every
        if done < self.every or since >= self.recovery_steps:
            return 1.0
        return RECOVERY_START + (1.0 - RECOVERY_START) * since / self.recovery_steps

    def end_of_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Advance the cycle; at its end refactorize and reset. Returns whether a reset happened."""
        for group in optimizer.param_groups:
            group["cycle_step"] = group.get("cycle_step", 0) + 1
        if optimizer.param_groups[0]["cycle_step"] % self.every:
            return False
        self.skipped = [name for name, B, A in self.pairs if not refactorize(B, A)]
        if self.skipped:
            warnings.warn(f"weight refactorization left {len(self.skipped)} low-rank pair(s) as they were because "
                          f"B A has rank < r (e.g. {self.skipped[0]}); their product is unchanged.", RuntimeWarning,
                          stacklevel=3)
        for state in optimizer.state.values():
            if self.moments == "all":
                state.clear()
            else:
                for key in FIRST_MOMENT_KEYS:
                    if key in state:
                        state[key].zero_()
        return True
