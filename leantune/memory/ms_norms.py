"""MS-LayerNorm / MS-RMSNorm: normalisations without affine that save only their output (Memory-Sharing BP).

Forward (per row of the last dimension, computed in fp32 or better, output in the input dtype):

    MS-RMSNorm:  rstd = 1 / sqrt(mean(x²) + ε),          y = x · rstd
    MS-LN:       rstd = 1 / sqrt(var(x) + ε) (biased),   y = (x − mean(x)) · rstd

Backward, written in terms of the saved *output* ``y`` and ``rstd`` (d = last-dim size):

    MS-RMSNorm:  dx = rstd · (dy − mean(dy ⊙ y) · y)
    MS-LN:       dx = rstd · (dy − mean(dy) − mean(dy ⊙ y) · y)

(The CPU backward is :func:`leantune.kernels.norms.reference_ms_norm_backward`, the Triton kernels' reference.)

``ctx.save_for_backward(y, rstd)``: ``y`` is the very tensor object returned, so when the next linear (or a LoRA-A)
saves its input, autograd keeps one storage for both; the norm itself then costs only ``rstd`` (4 bytes per row).
The affine ``γ, β`` is folded into the following frozen linears (see :mod:`leantune.memory.folding`).

Kernel contract (``kernel_for("ms_rmsnorm" | "ms_layernorm", x)``): a ``torch.autograd.Function``-like object with
static ``forward(ctx, x, eps)`` returning ``y`` (it must save ``y`` itself plus fp32 ``rstd`` of shape
``x.shape[:-1] + (1,)``) and ``backward(ctx, grad_y)`` returning ``(grad_x, None)``.
"""

from __future__ import annotations

import torch

from leantune.kernels.dispatch import kernel_for
from leantune.kernels.norms import reference_ms_norm_backward


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class MSRMSNormFunction(torch.autograd.Function):
    """``MSRMSNormFunction.apply(x, eps) -> y``; saves ``(y, rstd)``. The forward is bit-identical to the
    normalisation inside HF ``LlamaRMSNorm`` (``x.float() * rsqrt(mean(x²) + eps)`` then cast back)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float):
        kernel = kernel_for("ms_rmsnorm", x)
        ctx.kernel = kernel
        if kernel is not None:
            return kernel.forward(ctx, x, eps)
        xf = x.to(_compute_dtype(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if ctx.kernel is not None:
            return ctx.kernel.backward(ctx, grad_y)[0], None
        y, rstd = ctx.saved_tensors
        return reference_ms_norm_backward(grad_y, y, rstd, "rmsnorm"), None


class MSLayerNormFunction(torch.autograd.Function):
    """``MSLayerNormFunction.apply(x, eps) -> y``; saves ``(y, rstd)``. The forward is ``F.layer_norm`` without
    affine (computed by ``torch.native_layer_norm``, so bit-identical to it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float):
        kernel = kernel_for("ms_layernorm", x)
        ctx.kernel = kernel
        if kernel is not None:
            return kernel.forward(ctx, x, eps)
        y, _mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        rstd = rstd.to(_compute_dtype(x.dtype)).reshape(*x.shape[:-1], 1)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if ctx.kernel is not None:
            return ctx.kernel.backward(ctx, grad_y)[0], None
        y, rstd = ctx.saved_tensors
        return reference_ms_norm_backward(grad_y, y, rstd, "layernorm"), None


class MSNormAffineFunction(torch.autograd.Function):
    """``MSNormAffineFunction.apply(x, eps, kind, weight, bias) -> (y, weight ⊙ y + bias)`` for post-norm blocks
    (BERT/RoBERTa): ``y`` (the normalised output, saved and shared with the folded linears) and the affine output
    the residual path needs, with a frozen ``weight``/``bias`` (the norm's own, which folding requires frozen).
    Forward = :class:`MSLayerNormFunction` / :class:`MSRMSNormFunction` then ``addcmul``, so bit-identical to them;
    the backward folds both incoming gradients, ``g = dy + d(out) ⊙ weight``, into the norm backward (one C pass
    per row on CPU instead of a multiply, an add and the norm backward). Saves what the plain MS norm saves.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, kind: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("MSNormAffineFunction: the norm's weight and bias must be frozen (they are folded)")
        function = MSLayerNormFunction if kind == "layernorm" else MSRMSNormFunction
        y = function.forward(ctx, x, eps)
        ctx.kind, ctx.weight = kind, weight
        return y, (y * weight if bias is None else torch.addcmul(bias, y, weight))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_out: torch.Tensor):
        if ctx.kernel is not None:  # the kernel unpacks its saved tensors itself (once: checkpointing allows no more)
            return ctx.kernel.backward(ctx, torch.addcmul(grad_y, grad_out, ctx.weight))[0], None, None, None, None
        y, rstd = ctx.saved_tensors
        grad_x = reference_ms_norm_backward(grad_y, y, rstd, ctx.kind, grad_out=grad_out, weight=ctx.weight)
        return grad_x, None, None, None, None


def ms_norm_affine(x: torch.Tensor, kind: str, eps: float, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, weight ⊙ y + bias)`` of an MS norm for post-norm blocks; see :class:`MSNormAffineFunction`."""
    return MSNormAffineFunction.apply(x, eps, kind, weight, bias)


def ms_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional MS-RMSNorm (no affine); see :class:`MSRMSNormFunction`."""
    return MSRMSNormFunction.apply(x, eps)


def ms_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional MS-LayerNorm (no affine); see :class:`MSLayerNormFunction`."""
    return MSLayerNormFunction.apply(x, eps)


def normalize(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Dispatch on the norm ``kind`` ("layernorm" or one of the RMS kinds "rmsnorm", "t5", "gemma")."""
    if kind == "layernorm":
        return ms_layer_norm(x, eps)
    return ms_rms_norm(x, eps)
