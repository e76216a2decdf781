"""MS-RMSNorm / MS-LayerNorm (Memory-Sharing BP, Yang et al. ICML 2024): norms without affine that save their output.

Per row of width H (statistics in fp32, fp64 for fp64 inputs):

    RMSNorm:    rstd = 1/sqrt(mean(x²) + ε),            y = x · rstd
    LayerNorm:  μ = mean(x), rstd = 1/sqrt(var(x) + ε),  y = (x − μ) · rstd

Saved for backward: the **output** ``y`` (input dtype) and ``rstd`` (one per row, shape ``x.shape[:-1] + (1,)``),
never ``x``. The backward is written in terms of the output, so a following linear that saves the same ``y`` object
makes the norm cost only ``rstd``:

    MS-RMSNorm: dx = rstd · (g − mean(g ⊙ y) · y)
    MS-LN:      dx = rstd · (g − mean(g) − mean(g ⊙ y) · y)        g = dy  (+ d(out) ⊙ w, post-norm variant)

One autograd function, :class:`MSNormFunction`, for every caller (``leantune.memory``'s folded norms, the unfolded
``γ ⊙ MS-norm(x) + β`` patch, BERT's post-norm blocks). What differs is an argument:

* ``kind`` — ``"rmsnorm"`` (Llama, T5, Gemma: their γ or 1 + γ is applied by the caller) or ``"layernorm"``;
* ``weight`` / ``bias`` — the post-norm variant: also return ``out = weight ⊙ y + bias`` (frozen weight/bias; the
  residual path of BERT needs it, the folded linears take ``y``); its gradient joins the norm backward as
  ``g = dy + d(out) ⊙ weight`` in the same pass, and nothing more is saved.

Backends (one rule, :mod:`leantune.kernels.dispatch`): Triton on CUDA; on CPU the torch reference, whose backward
runs as one C pass per row when the CPU kernels are built (:mod:`leantune.kernels.cpu_native`). The torch forward is
bit-identical to Hugging Face's ``LlamaRMSNorm`` normalisation and to ``torch.native_layer_norm`` without affine.
"""

from __future__ import annotations

import torch

from leantune._utils import compute_dtype, upcast

from . import cpu_native
from ._triton import next_power_of_2, tl, triton
from .dispatch import interpreter_active, kernel_for, register_kernel

KINDS = ("rmsnorm", "layernorm")
_MAX_WIDTH = 65536  # one row per program; wider rows would not fit a block


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"MS norm: kind must be one of {KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------- torch reference


def reference_ms_norm(x: torch.Tensor, eps: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch forward → (y in x.dtype, rstd of shape ``x.shape[:-1]``, fp32 or fp64)."""
    _check_kind(kind)
    if kind == "layernorm":
        y, _mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        return y, rstd.to(compute_dtype(x.dtype)).reshape(x.shape[:-1])
    xf = upcast(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd.squeeze(-1)


def reference_ms_norm_backward(grad_y: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, kind: str,
                               native: bool = True, grad_out: torch.Tensor | None = None,
                               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Torch backward from the saved output (formulas in the module docstring), fp32 (fp64) math.

    ``rstd`` is one value per row, shaped ``x.shape[:-1]`` or ``x.shape[:-1] + (1,)``. ``grad_out``/``weight``: the
    post-norm variant (``g = dy + grad_out ⊙ weight``). On CPU (``native``) it runs as one C pass per row when the
    CPU kernels are available (fp32/bf16/fp64), else as the torch ops below.
    """
    if native and y.device.type == "cpu":
        dx = cpu_native.ms_norm_backward(grad_y, y, rstd.reshape(-1), kind, grad_out, weight)
        if dx is not None:
            return dx
    if grad_out is not None:
        grad_y = torch.addcmul(grad_y, grad_out, weight)
    dy, yf = upcast(grad_y), upcast(y)
    r = rstd.reshape(*y.shape[:-1], 1).to(dy.dtype)
    if kind == "layernorm":
        # ATen's LayerNorm backward with mean 0 and rstd 1 treats its input as x̂ = y and returns
        # dy − mean(dy) − mean(dy ⊙ y)·y in one fused pass; the per-row rstd is applied after.
        unit = torch.zeros_like(r)
        inner = torch.ops.aten.native_layer_norm_backward(dy, yf, (y.shape[-1],), unit, unit + 1, None, None,
                                                          [True, False, False])[0]
    else:
        inner = torch.addcmul(dy, (dy * yf).mean(-1, keepdim=True), yf, value=-1)
    return inner.mul_(r).to(grad_y.dtype)


def reference_ms_rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """MS-RMSNorm reference forward → (y, rstd)."""
    return reference_ms_norm(x, eps, "rmsnorm")


def reference_ms_layernorm(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """MS-LayerNorm reference forward → (y, rstd)."""
    return reference_ms_norm(x, eps, "layernorm")


# ----------------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _ms_norm_fwd_kernel(X, Y, RSTD, n_rows, H, eps, LAYERNORM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # upcast first: interpreter-safe bf16
    if LAYERNORM:
        x = tl.where(mask, x - (tl.sum(x, axis=1) / H)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + tl.cast(eps, tl.float32))
    tl.store(Y + offs, (x * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _ms_norm_bwd_kernel(DY, Y, RSTD, DX, n_rows, H, LAYERNORM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    inner = dy - (tl.sum(dy * y, axis=1) / H)[:, None] * y
    if LAYERNORM:
        inner = inner - (tl.sum(dy, axis=1) / H)[:, None]
    tl.store(DX + offs, (rstd[:, None] * inner).to(DX.dtype.element_ty), mask=mask)


def _launch_config(rows: int, width: int) -> tuple[tuple[int], int, int]:
    """One row per program on a GPU; under the interpreter (~1 ms per program) pack rows into one program."""
    block = next_power_of_2(width)
    per_program = min(next_power_of_2(rows), max(1, 16384 // block)) if interpreter_active() else 1
    return (triton.cdiv(rows, per_program),), per_program, block


def _rows(t: torch.Tensor, what: str) -> tuple[torch.Tensor, int, int]:
    width = t.shape[-1]
    if width > _MAX_WIDTH:
        raise ValueError(f"{what}: hidden size {width} exceeds the kernel's one-row block ({_MAX_WIDTH})")
    flat = t.contiguous().view(-1, width)
    return flat, flat.shape[0], width


def triton_ms_norm(x: torch.Tensor, eps: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward → (y, rstd fp32 of shape ``x.shape[:-1]``); same math as :func:`reference_ms_norm`."""
    flat, rows, width = _rows(x, f"ms_{kind}")
    y = torch.empty_like(flat)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        grid, per_program, block = _launch_config(rows, width)
        _ms_norm_fwd_kernel[grid](
            flat, y, rstd, rows, width, eps, LAYERNORM=kind == "layernorm", ROWS=per_program, BLOCK=block
        )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def triton_ms_norm_backward(grad_y: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, kind: str) -> torch.Tensor:
    """Triton backward from the saved output; same math as :func:`reference_ms_norm_backward`."""
    dy, rows, width = _rows(grad_y, f"ms_{kind} backward")
    yc = y.contiguous().view(-1, width)
    dx = torch.empty_like(dy)
    if rows:
        grid, per_program, block = _launch_config(rows, width)
        _ms_norm_bwd_kernel[grid](
            dy, yc, rstd.contiguous(), dx, rows, width, LAYERNORM=kind == "layernorm", ROWS=per_program, BLOCK=block
        )
    return dx.view(grad_y.shape)


# ----------------------------------------------------------------------------------------------- the op


def _op_name(kind: str) -> str:
    return "ms_layernorm" if kind == "layernorm" else "ms_rmsnorm"


class MSNormFunction(torch.autograd.Function):
    """``MSNormFunction.apply(x, eps, kind, weight=None, bias=None)`` → ``y``, or ``(y, weight ⊙ y + bias)`` when
    ``weight`` is given (post-norm variant). Saves ``(y, rstd)`` only; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, kind: str, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None):
        _check_kind(kind)
        if (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad):
            raise ValueError("MS norm (post-norm variant): weight and bias must be frozen (they are folded)")
        use_triton = kernel_for(_op_name(kind), x) is not None
        y, rstd = (triton_ms_norm if use_triton else reference_ms_norm)(x, eps, kind)
        ctx.save_for_backward(y, rstd.unsqueeze(-1))  # the returned y itself: shared with the next layer's input
        ctx.kind, ctx.use_triton, ctx.weight = kind, use_triton, weight
        if weight is None:
            return y
        return y, (y * weight if bias is None else torch.addcmul(bias, y, weight))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_out: torch.Tensor | None = None):
        y, rstd = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing allows no second unpack
        weight = ctx.weight if grad_out is not None else None
        if ctx.use_triton:
            g = grad_y if weight is None else torch.addcmul(grad_y, grad_out, weight)
            grad_x = triton_ms_norm_backward(g, y, rstd.squeeze(-1), ctx.kind)
        else:
            grad_x = reference_ms_norm_backward(grad_y, y, rstd, ctx.kind, grad_out=grad_out if weight is not None
                                                else None, weight=weight)
        return grad_x, None, None, None, None


def ms_norm(x: torch.Tensor, eps: float, kind: str = "rmsnorm") -> torch.Tensor:
    """MS norm of the last dimension (no affine); see :class:`MSNormFunction`."""
    return MSNormFunction.apply(x, eps, kind)


def ms_norm_affine(x: torch.Tensor, eps: float, kind: str, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, weight ⊙ y + bias)`` for post-norm blocks (frozen weight/bias); see :class:`MSNormFunction`."""
    return MSNormFunction.apply(x, eps, kind, weight, bias)


def ms_rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MS-RMSNorm of the last dimension (no affine)."""
    return ms_norm(x, eps, "rmsnorm")


def ms_layernorm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MS-LayerNorm of the last dimension (no affine)."""
    return ms_norm(x, eps, "layernorm")


register_kernel("ms_rmsnorm", triton_ms_norm)
register_kernel("ms_layernorm", triton_ms_norm)
