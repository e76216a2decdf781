"""ReGELU2 / ReSiLU2 (Approx-BP, Yang et al. ICML 2024): exact activation forward, 2-bit step-derivative backward.

The backward uses the derivative of h̃(x) = Σ_{i=1..3} a_i · max(x − c_i, 0) instead of h'(x):

    flag(x) = [x > c1] + [x > c2] + [x > c3]  ∈ {0, 1, 2, 3}
    ∂L/∂x   = ∂L/∂y · s_flag,   s_0 = 0, s_1 = a1, s_2 = a1 + a2, s_3 = a1 + a2 + a3 (= 1)

so only ``flag`` (2 bits) is saved per element. Storage layout: flattened contiguous element ``i`` occupies
bits ``2·(i mod 4) .. 2·(i mod 4)+1`` of byte ``i // 4`` (``ceil(numel/4)`` uint8). The forward is the model's exact
activation: GELU with ``approximate="none"`` (erf) or ``"tanh"``, SiLU ``x·σ(x)``, or the model's own function.

One autograd function, :class:`ApproxActivationFunction`, serves ``leantune.memory`` and the kernels patch alike.
Backends (one rule, :mod:`leantune.kernels.dispatch`): Triton on CUDA (one pass computing y and the flags, or only
the flags when the model's own forward is kept); on CPU the torch reference, whose flag packing and backward run as
single C loops when the CPU kernels are built (:mod:`leantune.kernels.cpu_native`; same bits as the torch ops).
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_native
from ._triton import next_power_of_2, tl, triton
from .dispatch import kernel_for, register_kernel

# (a1, a2, a3), (c1, c2, c3) fitted by the paper (Yang et al., ICML 2024, "Reducing Fine-Tuning Memory Overhead by
# Approximate and Memory-Sharing Backpropagation"; k = 2 → 3 thresholds).
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


def _check_code_bytes(codes: torch.Tensor, numel: int, name: str) -> None:
    if codes.numel() != math.ceil(numel / 4):
        raise ValueError(f"{name} backward: {codes.numel()} code bytes do not match a gradient of {numel} elements")


def _check(kind: str, approximate: str) -> None:
    if (kind, approximate) not in _ACT_ID:
        raise ValueError(
            f"{kind} does not support approximate={approximate!r}; use 'none' (or 'tanh' for regelu2 GELU models)"
        )


# ----------------------------------------------------------------------------------------------- torch reference


_TABLES: dict[tuple, torch.Tensor] = {}  # lookup tables of the CPU reference, built once per (constants, dtype, device)
_CHUNK = 1 << 18  # elements per step of the CPU reference loops (a multiple of 4; 1 MiB of fp32), tuned on CPU


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack a flat tensor of 2-bit codes (values 0..3) 4 per byte, element i at bits 2·(i mod 4)."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return _pack_words(flat)


def _pack_words(flat: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes (length a multiple of 4) into bytes."""
    if sys.byteorder == "little" and flat.numel():
        if flat.storage_offset() % 4:  # an int32 view needs an aligned start
            flat = flat.clone()
        # one int32 per 4 codes (byte j = code j); two shift-ors gather the 2-bit fields into the low byte
        word = flat.view(torch.int32)
        word = word | (word >> 6)
        word = word | (word >> 12)
        return (word & 0xFF).to(torch.uint8)
    q = flat.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack_2bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: uint8 codes of length ``numel``."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 3).reshape(-1)[:numel]


def step_codes(x: torch.Tensor, thresholds: tuple[float, float, float]) -> torch.Tensor:
    """Segment index ``Σ_i [x > c_i]`` as ``uint8``, unpacked (compared in fp32, fp64 for fp64 ``x``).

    The readable definition; the op computes the packed form directly (:func:`packed_step_flags`, same comparisons).
    """
    xf = x if x.dtype == torch.float64 else x.float()
    code = (xf > thresholds[0]).to(torch.uint8)
    code += xf > thresholds[1]
    code += xf > thresholds[2]
    return code


def _flag_table(thresholds: tuple[float, float, float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """uint8 flag of every 16-bit pattern of ``dtype`` (index = the bits read as unsigned), compared in fp32."""
    key = ("flags", thresholds, dtype, device)
    table = _TABLES.get(key)
    if table is None:
        values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).float()
        table = sum((values > c).to(torch.uint8) for c in thresholds).to(device)
        _TABLES[key] = table
    return table


def packed_step_flags(x: torch.Tensor, thresholds: tuple[float, float, float], native: bool = True) -> torch.Tensor:
    """``pack_2bit([x > c1] + [x > c2] + [x > c3])``, compared in fp32 (fp64 for fp64 ``x``).

    16-bit inputs look their flag up in a 65,536-entry table of all their bit patterns (one gather instead of a
    cast and three comparisons, and exact: the table is built with the fp32 comparisons). On CPU this runs as one
    C loop (:mod:`leantune.kernels.cpu_native`) when available and ``native``; otherwise as torch ops: wider inputs
    compare into float buffers (on CPU several times faster than bool outputs), in cache-sized chunks with reused
    buffers, so the scratch is a few MiB rather than full-size fp32 copies of the activation.
    """
    sixteen_bit = x.dtype in (torch.bfloat16, torch.float16)
    if native and x.device.type == "cpu":
        table = _flag_table(thresholds, x.dtype, x.device) if x.dtype == torch.float16 else None
        packed = cpu_native.step_flags(x, thresholds, table)
        if packed is not None:
            return packed
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty(math.ceil(n / 4), dtype=torch.uint8, device=x.device)
    if n == 0:
        return packed
    size = min(_CHUNK, 4 * math.ceil(n / 4))
    codes = torch.empty(size, dtype=torch.uint8, device=x.device)
    if sixteen_bit:
        table, bits, index = _flag_table(thresholds, x.dtype, x.device), flat.view(torch.int16), torch.empty(
            size, dtype=torch.int32, device=x.device)
    else:
        flags, scratch = (torch.empty(size, dtype=x.dtype, device=x.device) for _ in range(2))
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        if sixteen_bit:
            index[:m].copy_(bits[start:start + m]).bitwise_and_(0xFFFF)
            torch.index_select(table, 0, index[:m], out=codes[:m])
        else:
            part = flat[start:start + m]
            torch.gt(part, thresholds[0], out=flags[:m])
            flags[:m] += torch.gt(part, thresholds[1], out=scratch[:m])
            flags[:m] += torch.gt(part, thresholds[2], out=scratch[:m])
            codes[:m].copy_(flags[:m])
        width = math.ceil(m / 4)
        codes[m:4 * width] = 0  # last chunk: the final byte's unused 2-bit fields hold zeros
        packed[start // 4:start // 4 + width].copy_(_pack_words(codes[:4 * width]))
    return packed


def _byte_slope_table(slopes: tuple[float, float, float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 4] table: row ``b`` holds the slopes of the four flags packed in byte ``b``."""
    key = ("slopes", slopes, dtype, device)
    table = _TABLES.get(key)
    if table is None:
        per_flag = torch.tensor((0.0, *slopes), dtype=torch.float64)
        byte = torch.arange(256)
        table = torch.stack([per_flag[(byte >> shift) & 3] for shift in (0, 2, 4, 6)], 1).to(device=device, dtype=dtype)
        _TABLES[key] = table
    return table


def packed_step_backward(grad_y: torch.Tensor, packed: torch.Tensor, slopes: tuple[float, float, float],
                         native: bool = True) -> torch.Tensor:
    """``grad_y · s_flag`` with ``s = (0, *slopes)``, product in fp32 (fp64) and one rounding to ``grad_y.dtype``.

    One C loop on CPU when available and ``native`` (fp32, bf16, fp64 gradients). The torch path gathers one row
    per byte (4 slopes at once) instead of unpacking and indexing every element, chunked like
    :func:`packed_step_flags` so 16-bit gradients need no full-size fp32 temporaries.
    """
    n = grad_y.numel()
    _check_code_bytes(packed, n, "step")
    if native and grad_y.device.type == "cpu":
        out = cpu_native.step_backward(grad_y, packed, slopes)
        if out is not None:
            return out.view(grad_y.shape)
    flat = grad_y.reshape(-1)
    out = torch.empty(n, dtype=grad_y.dtype, device=grad_y.device)
    dtype = torch.promote_types(grad_y.dtype, torch.float32)
    table = _byte_slope_table(slopes, dtype, grad_y.device)
    buffer = None if dtype == grad_y.dtype else torch.empty(min(n, _CHUNK), dtype=dtype, device=grad_y.device)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        slope = table.index_select(0, packed[start // 4:start // 4 + math.ceil(m / 4)].int()).view(-1)[:m]
        if buffer is None:
            torch.mul(flat[start:start + m], slope, out=out[start:start + m])
        else:
            work = buffer[:m]
            work.copy_(flat[start:start + m]).mul_(slope)
            out[start:start + m].copy_(work)
    return out.view(grad_y.shape)


def reference_approx_activation(x: torch.Tensor, kind: str, approximate: str = "none",
                                forward_fn: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch forward: the exact activation (``forward_fn``, else ``F.gelu``/``F.silu`` in the input dtype, as the
    model computes it) and the packed 2-bit flags."""
    _check(kind, approximate)
    if forward_fn is not None:
        y = forward_fn(x)
    else:
        y = F.silu(x) if kind == "resilu2" else F.gelu(x, approximate=approximate)
    return y, packed_step_flags(x, _CONSTANTS[kind][1])  # x itself: 16-bit inputs use the table


def reference_approx_backward(grad_y: torch.Tensor, codes: torch.Tensor, kind: str) -> torch.Tensor:
    """Torch reference backward: ``grad_y · s_flag`` computed in fp32."""
    return packed_step_backward(grad_y, codes, step_slopes(kind))


def reference_regelu2(x: torch.Tensor, approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """ReGELU2 reference forward → (exact GELU(x), packed flags)."""
    return reference_approx_activation(x, "regelu2", approximate)


def reference_resilu2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReSiLU2 reference forward → (exact SiLU(x), packed flags)."""
    return reference_approx_activation(x, "resilu2")


# ----------------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _approx_act_fwd_kernel(X, Y, CODES, n, c1, c2, c3, ACT: tl.constexpr, STORE_Y: tl.constexpr,
                           BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # upcast first: interpreter-safe bf16
    if not STORE_Y:  # flags only: the caller computes y with the model's own function
        pass
    elif ACT == 0:  # GELU, erf form
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:  # GELU, tanh form; tanh(u) = 2σ(2u) − 1 (no libdevice)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        u = tl.minimum(tl.maximum(u, -20.0), 20.0)  # tanh is ±1 in fp32 there; avoids exp overflow
        y = 0.5 * x * (2.0 * tl.sigmoid(2.0 * u))
    else:  # SiLU
        y = x * tl.sigmoid(x)
    if STORE_Y:
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


def triton_approx_activation(x: torch.Tensor, kind: str, approximate: str = "none",
                             compute_y: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Triton forward → (activation, packed flags); same math as :func:`reference_approx_activation`.
    ``compute_y=False``: flags only (``None`` for the activation)."""
    _check(kind, approximate)
    xc = x.contiguous()
    n = xc.numel()
    y = torch.empty_like(xc) if compute_y else None
    codes = torch.empty(math.ceil(n / 4), dtype=torch.uint8, device=x.device)
    if n:
        _, (c1, c2, c3) = _CONSTANTS[kind]
        block = min(_BLOCK, max(4, next_power_of_2(n)))
        _approx_act_fwd_kernel[(triton.cdiv(n, block),)](
            xc, y if compute_y else codes, codes, n, c1, c2, c3, ACT=_ACT_ID[(kind, approximate)], STORE_Y=compute_y,
            BLOCK=block,
        )
    return (y.view(x.shape) if compute_y else None), codes


def triton_approx_backward(grad_y: torch.Tensor, codes: torch.Tensor, kind: str) -> torch.Tensor:
    """Triton backward ``grad_y · s_flag``; same math as :func:`reference_approx_backward`."""
    g = grad_y.contiguous()
    n = g.numel()
    _check_code_bytes(codes, n, kind)
    dx = torch.empty_like(g)
    if n:
        s1, s2, s3 = step_slopes(kind)
        block = min(_BLOCK, max(4, next_power_of_2(n)))
        _step_bwd_kernel[(triton.cdiv(n, block),)](g, codes, dx, n, s1, s2, s3, BLOCK=block)
    return dx.view(grad_y.shape)


# ----------------------------------------------------------------------------------------------- the op


class ApproxActivationFunction(torch.autograd.Function):
    """``ApproxActivationFunction.apply(x, kind, approximate="none", forward_fn=None) -> y``: exact forward,
    step-derivative backward; saves only the packed 2-bit flags (``ceil(numel/4)`` bytes).

    ``kind``: "regelu2" (GELU, ``approximate`` "none" = erf or "tanh") or "resilu2" (SiLU). ``forward_fn``: the
    model's own activation (e.g. GPT-2's python ``gelu_new``), called for ``y`` so the forward stays bit-identical
    to the model; the flags are computed alongside (by the Triton flags kernel on CUDA). Without it ``y`` is
    ``F.gelu`` / ``F.silu`` on CPU (the model's math) or the Triton kernel on CUDA.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str, approximate: str = "none", forward_fn: Callable | None = None):
        _check(kind, approximate)
        use_triton = kernel_for(kind, x) is not None
        if use_triton:
            y, codes = triton_approx_activation(x, kind, approximate, compute_y=forward_fn is None)
            y = forward_fn(x) if forward_fn is not None else y
        else:
            y, codes = reference_approx_activation(x, kind, approximate, forward_fn)
        ctx.save_for_backward(codes)
        ctx.kind, ctx.use_triton = kind, use_triton
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (codes,) = ctx.saved_tensors
        bwd = triton_approx_backward if ctx.use_triton else reference_approx_backward
        return bwd(grad_y, codes, ctx.kind), None, None, None


def regelu2(x: torch.Tensor, approximate: str = "none", forward_fn: Callable | None = None) -> torch.Tensor:
    """GELU forward (erf or tanh form, or ``forward_fn``), ReGELU2 backward."""
    return ApproxActivationFunction.apply(x, "regelu2", approximate, forward_fn)


def resilu2(x: torch.Tensor, forward_fn: Callable | None = None) -> torch.Tensor:
    """SiLU forward (or ``forward_fn``), ReSiLU2 backward."""
    return ApproxActivationFunction.apply(x, "resilu2", "none", forward_fn)


class ApproxActivation(nn.Module):
    """Drop-in replacement for a GELU/SiLU module: same forward (the original's), 2-bit backward.

    ``kind`` is "gelu" (ReGELU2 constants) or "silu" (ReSiLU2); ``approximate`` None keeps the original module's
    forward (bit-identical), "none"/"tanh" use ``F.gelu``. Outside autograd it simply calls the original.
    """

    def __init__(self, original: nn.Module | Callable, kind: str, approximate: str | None = None):
        super().__init__()
        if kind not in ("gelu", "silu"):
            raise ValueError(f"ApproxActivation: kind must be 'gelu' or 'silu', got {kind!r}")
        self.kind, self.approximate, self.original = kind, approximate, original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_activation(x, self.kind, self.approximate, self.original)

    def extra_repr(self) -> str:
        return f"{'ReSiLU2' if self.kind == 'silu' else 'ReGELU2'}, forward={type(self.original).__name__}"


def approx_activation(x: torch.Tensor, kind: str, approximate: str | None, original: Callable) -> torch.Tensor:
    """``original(x)`` with the 2-bit backward of ``kind`` ("gelu"/"silu") when autograd needs it.

    ``approximate`` None: ``original`` computes the forward (exact model math); else ``F.gelu(approximate=)``.
    """
    if not torch.is_grad_enabled() or not x.requires_grad:
        return original(x)
    forward_fn = original if approximate is None else None
    if kind == "silu":
        return resilu2(x, forward_fn)
    return regelu2(x, approximate or "none", forward_fn)


register_kernel("regelu2", triton_approx_activation)
register_kernel("resilu2", triton_approx_activation)
