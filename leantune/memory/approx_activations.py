"""ReGELU2 / ReSiLU2: exact GELU/SiLU forward, 2-bit step-derivative backward (Approx-BP, Yang et al., ICML 2024).

The backward pass uses the derivative of the surrogate

    h̃(x) = Σ_{i=1..3} a_i · max(x − c_i, 0),   Σ a_i = 1,  Σ a_i c_i = 0,

i.e. the step function  h̃'(x) = Σ_i a_i · [x > c_i]  (strict ``>``). Only the segment index
``code = [x > c1] + [x > c2] + [x > c3] ∈ {0, 1, 2, 3}`` is saved, packed four codes per ``uint8``
(element ``i`` in bits ``2·(i mod 4)`` .. ``2·(i mod 4)+1`` of byte ``i // 4``): 1/8 of a bf16 input, 1/16 of fp32.

Kernel contract (``leantune.kernels.dispatch.kernel_for("regelu2" | "resilu2", x)``): the registered object must be
a ``torch.autograd.Function`` subclass (or anything with static ``forward(ctx, x, approximate)`` and
``backward(ctx, grad_y)``) computing the same thing: ``forward`` returns ``y`` and saves what its own ``backward``
needs; ``backward`` returns ``(grad_x, None)``. For ReSiLU2 ``approximate`` is ignored (pass ``"none"``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leantune.kernels.activations import (
    REGELU2_CONSTANTS,
    RESILU2_CONSTANTS,
    pack_2bit,
    packed_step_backward,
    packed_step_flags,
    step_slopes,
    unpack_2bit,
)
from leantune.kernels.dispatch import kernel_for

__all__ = ["ReGELU2Function", "ReSiLU2Function", "ApproxActivation", "regelu2", "resilu2", "step_codes",
           "pack_2bit", "unpack_2bit"]

# (a_1, a_2, a_3), (c_1, c_2, c_3) fitted by the authors (LowMemoryBP, k = 2); one copy, in leantune.kernels.
REGELU2_SLOPES, REGELU2_THRESHOLDS = REGELU2_CONSTANTS
RESILU2_SLOPES, RESILU2_THRESHOLDS = RESILU2_CONSTANTS


def step_codes(x: torch.Tensor, thresholds: tuple[float, float, float]) -> torch.Tensor:
    """Segment index ``Σ_i [x > c_i]`` as ``uint8`` (comparison in fp32 or better, thresholds are fp64 constants).

    The readable definition; the autograd functions compute the packed form directly
    (:func:`leantune.kernels.activations.packed_step_flags`, same comparisons).
    """
    xf = x if x.dtype == torch.float64 else x.float()
    code = (xf > thresholds[0]).to(torch.uint8)
    code += xf > thresholds[1]
    code += xf > thresholds[2]
    return code


class ReGELU2Function(torch.autograd.Function):
    """``y = GELU(x)`` exactly (``approximate`` ∈ {"none", "tanh"} as in ``F.gelu``); backward ``dx = dy · h̃'(x)``.

    Signature: ``ReGELU2Function.apply(x, approximate="none", forward_fn=None)``. ``forward_fn`` lets a model keep
    its own bit-exact GELU implementation (e.g. GPT-2's python ``gelu_new``); then no kernel is used for the forward.
    Saves one packed ``uint8`` tensor of ``ceil(numel/4)`` bytes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, approximate: str = "none", forward_fn: Callable | None = None):
        kernel = kernel_for("regelu2", x) if forward_fn is None else None
        ctx.kernel = kernel
        if kernel is not None:
            return kernel.forward(ctx, x, approximate)
        y = forward_fn(x) if forward_fn is not None else F.gelu(x, approximate=approximate)
        ctx.save_for_backward(packed_step_flags(x, REGELU2_THRESHOLDS))
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if ctx.kernel is not None:
            return (*ctx.kernel.backward(ctx, grad_y), None)[:3]
        (packed,) = ctx.saved_tensors
        return packed_step_backward(grad_y, packed, step_slopes("regelu2")), None, None


class ReSiLU2Function(torch.autograd.Function):
    """``y = SiLU(x) = x·σ(x)`` exactly; backward ``dx = dy · h̃'(x)`` with the ReSiLU2 constants.

    Signature: ``ReSiLU2Function.apply(x, forward_fn=None)``; saves ``ceil(numel/4)`` bytes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_fn: Callable | None = None):
        kernel = kernel_for("resilu2", x) if forward_fn is None else None
        ctx.kernel = kernel
        if kernel is not None:
            return kernel.forward(ctx, x, "none")
        y = forward_fn(x) if forward_fn is not None else F.silu(x)
        ctx.save_for_backward(packed_step_flags(x, RESILU2_THRESHOLDS))
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if ctx.kernel is not None:
            return ctx.kernel.backward(ctx, grad_y)[0], None
        (packed,) = ctx.saved_tensors
        return packed_step_backward(grad_y, packed, step_slopes("resilu2")), None


def regelu2(x: torch.Tensor, approximate: str = "none", forward_fn: Callable | None = None) -> torch.Tensor:
    """Functional ReGELU2 (see :class:`ReGELU2Function`)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"regelu2: approximate must be 'none' or 'tanh', got {approximate!r}")
    return ReGELU2Function.apply(x, approximate, forward_fn)


def resilu2(x: torch.Tensor, forward_fn: Callable | None = None) -> torch.Tensor:
    """Functional ReSiLU2 (see :class:`ReSiLU2Function`)."""
    return ReSiLU2Function.apply(x, forward_fn)


class ApproxActivation(nn.Module):
    """Drop-in replacement for a model's GELU/SiLU module: same forward (calls the original), 2-bit backward.

    ``kind`` is "gelu" (ReGELU2 constants) or "silu" (ReSiLU2). ``original`` is the replaced module; it is kept so
    the forward stays bit-identical and so :func:`leantune.memory.restore` can put it back.
    """

    def __init__(self, original: nn.Module | Callable, kind: str, approximate: str | None = None):
        super().__init__()
        if kind not in ("gelu", "silu"):
            raise ValueError(f"ApproxActivation: kind must be 'gelu' or 'silu', got {kind!r}")
        self.kind = kind
        self.approximate = approximate  # None: call `original` (exact model forward); else use F.gelu(approximate=)
        self.original = original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.original(x)
        if self.kind == "silu":
            return resilu2(x, None if self.approximate is not None else self.original)
        if self.approximate is not None:
            return regelu2(x, self.approximate)
        return regelu2(x, "none", self.original)

    def extra_repr(self) -> str:
        name = "ReSiLU2" if self.kind == "silu" else "ReGELU2"
        return f"{name}, forward={type(self.original).__name__}"
