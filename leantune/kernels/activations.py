"""ReGELU2 / ReSiLU2 (Approx-BP, Yang et al. ICML 2024): exact activation forward, 2-bit step-derivative backward.

The backward uses the derivative of h̃(x) = Σ_{i=1..3} a_i · max(x − c_i, 0) instead of h'(x):

    flag(x) = [x > c1] + [x > c2] + [x > c3]  ∈ {0, 1, 2, 3}
    ∂L/∂x   = ∂L/∂y · s_flag,   s_0 = 0, s_1 = a1, s_2 = a1 + a2, s_3 = a1 + a2 + a3 (= 1)

so only ``flag`` (2 bits) is saved per element. Storage layout: flattened contiguous element ``i`` occupies
bits ``2·(i mod 4) .. 2·(i mod 4)+1`` of byte ``i // 4`` (``ceil(numel/4)`` uint8). The forward is the model's exact
activation computed in fp32: GELU with ``approximate="none"`` (erf) or ``"tanh"``, or SiLU ``x·σ(x)``.

Registered kernels ``"regelu2"`` and ``"resilu2"`` (see :class:`ApproxActivationKernel`) follow this contract:

* ``fn(x, approximate="none") -> y`` — differentiable (Triton forward + Triton backward);
* ``fn.forward(ctx, x, approximate="none") -> y`` — called inside the caller's autograd ``forward`` with its ``ctx``;
  saves the packed codes (uint8 ``[ceil(numel/4)]``) with ``ctx.save_for_backward``;
* ``fn.backward(ctx, grad_y) -> (grad_x, None)`` — from the caller's autograd ``backward``.

The stateless launchers :func:`triton_approx_activation` (→ ``(y, codes)``) and :func:`triton_approx_backward`
``(grad_y, codes, kind)`` are public too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import compute_dtype, next_power_of_2, tl, triton
from .dispatch import kernel_for, register_kernel

# (a1, a2, a3), (c1, c2, c3) fitted by the paper (k = 2 → 3 thresholds), see spec §1.1.
REGELU2_CONSTANTS = (
    (-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
    (-3.1858810036855245, -0.001178821281161997, 3.190832613414926),
)
RESILU2_CONSTANTS = (
    (-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
    (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708),
)
_CONSTANTS = {"regelu2": REGELU2_CONSTANTS, "resilu2": RESILU2_CONSTANTS}
_ACT_ID = {("regelu2", "none"): 0, ("regelu2", "tanh"): 1, ("resilu2", "none"): 2}
_BLOCK = 1024  # elements per program; a multiple of 4 so every program writes whole bytes


def step_slopes(kind: str) -> tuple[float, float, float]:
    """The slopes s_1, s_2, s_3 of the step derivative (s_0 = 0), in float64."""
    (a1, a2, a3), _ = _CONSTANTS[kind]
    return a1, a1 + a2, a1 + a2 + a3


def _check(kind: str, approximate: str) -> None:
    if (kind, approximate) not in _ACT_ID:
        raise ValueError(
            f"{kind} does not support approximate={approximate!r}; use 'none' (or 'tanh' for regelu2 GELU models)"
        )


# ----------------------------------------------------------------------------------------------- torch reference


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack a flat tensor of 2-bit codes (values 0..3) 4 per byte, element i at bits 2·(i mod 4)."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    q = flat.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack_2bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: uint8 codes of length ``numel``."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 3).reshape(-1)[:numel]


def reference_approx_activation(x: torch.Tensor, kind: str, approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference forward: exact activation in fp32 (cast back) and packed 2-bit flags."""
    _check(kind, approximate)
    xf = compute_dtype(x)
    y = F.silu(xf) if kind == "resilu2" else F.gelu(xf, approximate=approximate)
    _, (c1, c2, c3) = _CONSTANTS[kind]
    flags = (xf > c1).to(torch.uint8) + (xf > c2).to(torch.uint8) + (xf > c3).to(torch.uint8)
    return y.to(x.dtype), pack_2bit(flags)


def reference_approx_backward(grad_y: torch.Tensor, codes: torch.Tensor, kind: str) -> torch.Tensor:
    """Torch reference backward: ``grad_y · s_flag`` computed in fp32."""
    gf = compute_dtype(grad_y)
    table = torch.tensor((0.0, *step_slopes(kind)), dtype=gf.dtype, device=grad_y.device)
    slope = table[unpack_2bit(codes, grad_y.numel()).long()].view(grad_y.shape)
    return (gf * slope).to(grad_y.dtype)


def reference_regelu2(x: torch.Tensor, approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """ReGELU2 reference forward → (exact GELU(x), packed flags)."""
    return reference_approx_activation(x, "regelu2", approximate)


def reference_resilu2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReSiLU2 reference forward → (exact SiLU(x), packed flags)."""
    return reference_approx_activation(x, "resilu2")


# ----------------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _approx_act_fwd_kernel(X, Y, CODES, n, c1, c2, c3, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # upcast first: interpreter-safe bf16
    if ACT == 0:  # GELU, erf form
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:  # GELU, tanh form; tanh(u) = 2σ(2u) − 1 (no libdevice)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        u = tl.minimum(tl.maximum(u, -20.0), 20.0)  # tanh is ±1 in fp32 there; avoids exp overflow
        y = 0.5 * x * (2.0 * tl.sigmoid(2.0 * u))
    else:  # SiLU
        y = x * tl.sigmoid(x)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    flag = (x > c1).to(tl.int32) + (x > c2).to(tl.int32) + (x > c3).to(tl.int32)
    flag = tl.where(mask, flag, 0)
    shifts = (tl.arange(0, 4) * 2)[None, :]
    packed = tl.sum(tl.reshape(flag, (BLOCK // 4, 4)) << shifts, axis=1)
    byte_offs = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    tl.store(CODES + byte_offs, packed.to(tl.uint8), mask=byte_offs < (n + 3) // 4)


@triton.jit
def _step_bwd_kernel(DY, CODES, DX, n, s1, s2, s3, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    byte = tl.load(CODES + offs // 4, mask=mask, other=0).to(tl.int32)
    flag = (byte >> ((offs % 4) * 2)) & 3
    slope = tl.where(flag == 3, s3, tl.where(flag == 2, s2, tl.where(flag == 1, s1, 0.0)))
    tl.store(DX + offs, (dy * slope).to(DX.dtype.element_ty), mask=mask)


def triton_approx_activation(x: torch.Tensor, kind: str, approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward → (activation, packed flags); same math as :func:`reference_approx_activation`."""
    _check(kind, approximate)
    xc = x.contiguous()
    n = xc.numel()
    y = torch.empty_like(xc)
    codes = torch.empty(math.ceil(n / 4), dtype=torch.uint8, device=x.device)
    if n:
        _, (c1, c2, c3) = _CONSTANTS[kind]
        block = min(_BLOCK, max(4, next_power_of_2(n)))
        _approx_act_fwd_kernel[(triton.cdiv(n, block),)](
            xc, y, codes, n, c1, c2, c3, ACT=_ACT_ID[(kind, approximate)], BLOCK=block
        )
    return y.view(x.shape), codes


def triton_approx_backward(grad_y: torch.Tensor, codes: torch.Tensor, kind: str) -> torch.Tensor:
    """Triton backward ``grad_y · s_flag``; same math as :func:`reference_approx_backward`."""
    g = grad_y.contiguous()
    n = g.numel()
    if codes.numel() != math.ceil(n / 4):
        raise ValueError(f"{kind} backward: {codes.numel()} code bytes do not match a gradient of {n} elements")
    dx = torch.empty_like(g)
    if n:
        s1, s2, s3 = step_slopes(kind)
        block = min(_BLOCK, max(4, next_power_of_2(n)))
        _step_bwd_kernel[(triton.cdiv(n, block),)](g, codes, dx, n, s1, s2, s3, BLOCK=block)
    return dx.view(grad_y.shape)


# ----------------------------------------------------------------------------------------------- autograd + dispatch


class ApproxActivationFunction(torch.autograd.Function):
    """Exact activation forward, step-derivative backward; saves only the packed 2-bit flags."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str, approximate: str, use_triton: bool) -> torch.Tensor:
        fwd = triton_approx_activation if use_triton else reference_approx_activation
        y, codes = fwd(x, kind, approximate)
        ctx.save_for_backward(codes)
        ctx.kind, ctx.use_triton = kind, use_triton
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (codes,) = ctx.saved_tensors
        bwd = triton_approx_backward if ctx.use_triton else reference_approx_backward
        return bwd(grad_y, codes, ctx.kind), None, None, None


class ApproxActivationKernel:
    """The object registered as ``"regelu2"`` / ``"resilu2"`` (contract in the module docstring).

    ``forward(ctx, x, approximate)`` / ``backward(ctx, grad_y)`` are meant to be called from inside another
    ``torch.autograd.Function`` (``leantune.memory``) with that function's ``ctx``; calling the object itself is the
    stand-alone differentiable op.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        return ApproxActivationFunction.apply(x, self.kind, approximate, True)

    def forward(self, ctx, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        y, codes = triton_approx_activation(x, self.kind, approximate)
        ctx.save_for_backward(codes)
        return y

    def backward(self, ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        (codes,) = ctx.saved_tensors
        return triton_approx_backward(grad_y, codes, self.kind), None


def regelu2(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU forward (erf or tanh form), ReGELU2 backward; Triton on CUDA, torch reference elsewhere."""
    return ApproxActivationFunction.apply(x, "regelu2", approximate, kernel_for("regelu2", x) is not None)


def resilu2(x: torch.Tensor) -> torch.Tensor:
    """SiLU forward, ReSiLU2 backward; Triton on CUDA, torch reference elsewhere."""
    return ApproxActivationFunction.apply(x, "resilu2", "none", kernel_for("resilu2", x) is not None)


register_kernel("regelu2", ApproxActivationKernel("regelu2"))
register_kernel("resilu2", ApproxActivationKernel("resilu2"))
