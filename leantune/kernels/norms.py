"""MS-RMSNorm / MS-LayerNorm (Memory-Sharing BP, Yang et al. ICML 2024): norms without affine that save their output.

Per row of width H (fp32 statistics):

    RMSNorm:    rstd = 1/sqrt(mean(x²) + ε),            y = x · rstd
    LayerNorm:  μ = mean(x), rstd = 1/sqrt(var(x) + ε),  y = (x − μ) · rstd

Saved for backward: the **output** ``y`` (input dtype) and ``rstd`` (fp32, one per row), never ``x``. The backward is
written in terms of the output, so a following linear that saves the same ``y`` object makes the norm ~free:

    MS-RMSNorm: dx = rstd · (dy − mean(dy ⊙ y) · y)
    MS-LN:      dx = rstd · (dy − mean(dy) − mean(dy ⊙ y) · y)

The affine (γ, β) is not part of the kernel: callers either fold it into the next linear or apply ``γ ⊙ y + β``
themselves (exact for Llama-style RMSNorm, whose γ multiplies the normalised output).

Registered kernels ``"ms_rmsnorm"`` and ``"ms_layernorm"`` (see :class:`MSNormKernel`) follow this contract:

* ``fn(x, eps) -> y`` — differentiable, normalises the last dimension;
* ``fn.forward(ctx, x, eps) -> y`` — inside the caller's autograd ``forward``; saves ``(y, rstd)`` on ``ctx``
  (``y`` the returned object, ``rstd`` fp32 of shape ``x.shape[:-1] + (1,)``);
* ``fn.backward(ctx, grad_y) -> (grad_x, None)``.

Stateless launchers: :func:`triton_ms_norm` ``(x, eps, kind) -> (y, rstd)`` and :func:`triton_ms_norm_backward`.
"""

from __future__ import annotations

import torch

from . import cpu_native
from ._triton import compute_dtype, next_power_of_2, tl, triton
from .dispatch import interpreter_active, kernel_for, register_kernel

_MAX_WIDTH = 65536  # one row per program; wider rows would not fit a block


# ----------------------------------------------------------------------------------------------- torch reference


def reference_ms_norm(x: torch.Tensor, eps: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference forward → (y in x.dtype, rstd fp32 [rows])."""
    xf = compute_dtype(x)
    if kind == "layernorm":
        xf = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd.squeeze(-1)


def reference_ms_norm_backward(grad_y: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, kind: str,
                               native: bool = True, grad_out: torch.Tensor | None = None,
                               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference backward from the saved output (formulas in the module docstring), fp32 (fp64) math.

    ``rstd`` is one value per row, shaped ``[rows]`` or ``x.shape[:-1] + (1,)``. ``grad_out``/``weight``: the
    caller also returned ``weight ⊙ y + β`` (a post-norm residual), whose gradient joins as ``dy + grad_out ⊙
    weight``. Also the CPU path of :mod:`leantune.memory.ms_norms`: there (``native``) it runs as one C pass per row
    when the CPU kernels are available (:mod:`leantune.kernels.cpu_native`, fp32/bf16/fp64), else as the torch ops
    below.
    """
    if native and y.device.type == "cpu":
        dx = cpu_native.ms_norm_backward(grad_y, y, rstd.reshape(-1), kind, grad_out, weight)
        if dx is not None:
            return dx
    if grad_out is not None:
        grad_y = torch.addcmul(grad_y, grad_out, weight)
    dy, yf = compute_dtype(grad_y), compute_dtype(y)
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
    """Triton forward → (y, rstd); same math as :func:`reference_ms_norm`."""
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


# ----------------------------------------------------------------------------------------------- autograd + dispatch


class MSNormFunction(torch.autograd.Function):
    """Normalise the last dimension without affine; save (y, rstd) and differentiate from the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, kind: str, use_triton: bool) -> torch.Tensor:
        y, rstd = (triton_ms_norm if use_triton else reference_ms_norm)(x, eps, kind)
        ctx.save_for_backward(y, rstd)  # the output itself: shared with the next layer's saved input
        ctx.kind, ctx.use_triton = kind, use_triton
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        y, rstd = ctx.saved_tensors
        bwd = triton_ms_norm_backward if ctx.use_triton else reference_ms_norm_backward
        return bwd(grad_y, y, rstd, ctx.kind), None, None, None


class MSNormKernel:
    """The object registered as ``"ms_rmsnorm"`` / ``"ms_layernorm"`` (contract in the module docstring)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        return MSNormFunction.apply(x, eps, self.kind, True)

    def forward(self, ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = triton_ms_norm(x, eps, self.kind)
        ctx.save_for_backward(y, rstd.unsqueeze(-1))  # the returned y itself: shared with the next layer
        return y

    def backward(self, ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, rstd = ctx.saved_tensors
        return triton_ms_norm_backward(grad_y, y, rstd, self.kind), None


def ms_rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MS-RMSNorm of the last dimension (no affine); Triton on CUDA, torch reference elsewhere."""
    return MSNormFunction.apply(x, eps, "rmsnorm", kernel_for("ms_rmsnorm", x) is not None)


def ms_layernorm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MS-LayerNorm of the last dimension (no affine); Triton on CUDA, torch reference elsewhere."""
    return MSNormFunction.apply(x, eps, "layernorm", kernel_for("ms_layernorm", x) is not None)


register_kernel("ms_rmsnorm", MSNormKernel("rmsnorm"))
register_kernel("ms_layernorm", MSNormKernel("layernorm"))
