"""Fused low-rank adapter linear: the adapter path in the base GEMM's epilogue, LoRAFusion-style backward.

For X ∈ R^{M×K}, frozen W ∈ R^{N×K}, adapter A ∈ R^{r×K}, B ∈ R^{N×r}, scale s:

    forward:   S = X Aᵀ                      (rank-r GEMM, library)
               Y = X Wᵀ + s · S Bᵀ (+ bias)  (one Triton GEMM; s·S Bᵀ + bias is its epilogue)
    backward:  dS = s · dY B,  dB = s · dYᵀ S     (one Triton pass over dY; dB accumulated with atomics)
               dX = dY W + dS A                 (one Triton GEMM; dS A is its epilogue)
               dA = dSᵀ X                       (library GEMM);  dW = dYᵀ X, dbias = Σ dY only if they need grad

Saved: X, S (rank r) and the weights — the same as an unfused LoRA layer with a frozen base, minus B's input copy.
Any adapter exposing ΔW = s · B_eff A_eff can use it (LoRA, rsLoRA, PiSSA, ...); **NOLA** must pass its bases
already materialised as A = Σ α_i A_i, B = Σ β_j B_j, built once per optimizer step (never per token) by the layer.
LoRA dropout is not fused: callers use this only when dropout is the identity (p = 0 or eval mode).

Registered kernel ``"lora_linear"``: ``fn(x, W, bias, A, B, scale) -> y``, differentiable, ``x`` of shape
``[..., K]`` and all of x, W, A, B (and bias) of one dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leantune._utils import scale_columns

from ._triton import dot_in_fp32, next_power_of_2, tl, triton
from .dispatch import kernel_for, register_kernel

_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32  # one fixed config: no multi-config autotune (interpreter-safe)


def reference_lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """Torch reference ``Y = X Wᵀ + s (X Aᵀ) Bᵀ + bias`` (plain autograd ops)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


# ----------------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _lora_xw_sb_kernel(
    X, W, S, B, BIAS, Y, M, N, K, R, scale,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(W + rn[None, :] * K + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    # epilogue: the adapter term s · S Bᵀ on the same output tile
    rr = tl.arange(0, BLOCK_R)
    s = tl.load(S + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    b = tl.load(B + rn[None, :] * R + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
    if DOT_FP32:
        low = tl.dot(s.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        low = tl.dot(s, b)
    acc += tl.cast(scale, tl.float32) * low
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _lora_dys_dyb_kernel(
    DY, S, B, DS, DB, M, N, R, scale,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    s = tl.load(S + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    if DOT_FP32:
        s = s.to(tl.float32)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):  # each dY tile is read once and feeds both dS and dB
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        b = tl.load(B + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        if DOT_FP32:
            dy = dy.to(tl.float32)
            ds += tl.dot(dy, b.to(tl.float32), input_precision="ieee")
            db = tl.dot(tl.trans(dy), s, input_precision="ieee")
        else:
            ds += tl.dot(dy, b)
            db = tl.dot(tl.trans(dy), s)
        db_mask = (rn[:, None] < N) & (rr[None, :] < R)
        tl.atomic_add(DB + rn[:, None] * R + rr[None, :], db * tl.cast(scale, tl.float32), mask=db_mask)
    ds = ds * tl.cast(scale, tl.float32)
    tl.store(DS + rm[:, None] * R + rr[None, :], ds.to(DS.dtype.element_ty), mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _lora_dyw_dsa_kernel(
    DY, W, DS, A, DX, M, N, K, R,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = tl.load(W + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        if DOT_FP32:
            acc += tl.dot(dy.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(dy, w)
    rr = tl.arange(0, BLOCK_R)  # epilogue: the adapter term dS A
    ds = tl.load(DS + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = tl.load(A + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    if DOT_FP32:
        acc += tl.dot(ds.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(ds, a)
    tl.store(DX + rm[:, None] * K + rk[None, :], acc.to(DX.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


def _block_r(rank: int) -> int:
    return max(16, next_power_of_2(rank))


def triton_lora_forward(x2d, weight, bias, lora_a, s, lora_b, scale):
    """Launch the forward GEMM with the fused adapter epilogue; ``s = x2d Aᵀ`` is computed by the caller."""
    (m, k), n, r = x2d.shape, weight.shape[0], lora_a.shape[0]
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    _lora_xw_sb_kernel[grid](
        x2d, weight, s, lora_b, bias if bias is not None else y, y, m, n, k, r, float(scale),
        HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x2d, weight),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, BLOCK_R=_block_r(r),
    )  # fmt: skip
    return y


def triton_lora_backward_ds_db(dy, s, lora_b, scale):
    """One pass over dY → (dS = s·dY B in dY's dtype, dB = s·dYᵀ S in fp32)."""
    (m, n), r = dy.shape, s.shape[1]
    ds = torch.empty((m, r), dtype=dy.dtype, device=dy.device)
    db = torch.zeros((n, r), dtype=torch.float32, device=dy.device)
    _lora_dys_dyb_kernel[(triton.cdiv(m, _BLOCK_M),)](
        dy, s, lora_b, ds, db, m, n, r, float(scale),
        DOT_FP32=dot_in_fp32(dy, lora_b), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_R=_block_r(r),
    )  # fmt: skip
    return ds, db


def triton_lora_backward_dx(dy, weight, ds, lora_a):
    """dX = dY W + dS A in one GEMM (adapter term in the epilogue)."""
    (m, n), k, r = dy.shape, weight.shape[1], lora_a.shape[0]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(k, _BLOCK_K))
    _lora_dyw_dsa_kernel[grid](
        dy, weight, ds, lora_a, dx, m, n, k, r,
        DOT_FP32=dot_in_fp32(dy, weight),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, BLOCK_R=_block_r(r),
    )  # fmt: skip
    return dx


class FusedLoRALinearFunction(torch.autograd.Function):
    """Triton-fused ``X Wᵀ + s (X Aᵀ) Bᵀ + bias`` with the fused backward described in the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        weight, lora_a, lora_b = weight.contiguous(), lora_a.contiguous(), lora_b.contiguous()
        s = (x2d @ lora_a.t()).contiguous()  # rank-r down-projection: library GEMM
        y = triton_lora_forward(x2d, weight, bias.contiguous() if bias is not None else None, lora_a, s, lora_b, scale)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, s)
        ctx.scale, ctx.x_shape, ctx.has_bias = scale, x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, lora_a, lora_b, s = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx = dw = dbias = da = db = None
        ds, db32 = triton_lora_backward_ds_db(dy, s, lora_b, ctx.scale)
        if need_b:
            db = db32.to(lora_b.dtype)
        if need_a:
            da = ds.t() @ x2d
        if need_x:
            dx = triton_lora_backward_dx(dy, weight, ds, lora_a).view(ctx.x_shape)
        if need_w:
            dw = dy.t() @ x2d
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, None


def _check(x, weight, bias, lora_a, lora_b) -> None:
    k, (n, r) = x.shape[-1], lora_b.shape
    if weight.shape != (n, k) or lora_a.shape != (r, k):
        raise ValueError(
            f"fused_lora_linear: shapes do not chain: x [..., {k}], W {tuple(weight.shape)} (expected [{n}, {k}]), "
            f"A {tuple(lora_a.shape)} (expected [{r}, {k}]), B {tuple(lora_b.shape)}"
        )
    dtypes = {t.dtype for t in (x, weight, lora_a, lora_b) + ((bias,) if bias is not None else ())}
    if len(dtypes) > 1:
        raise TypeError(f"fused_lora_linear: x, W, A, B and bias must share one dtype, got {sorted(map(str, dtypes))}")


class FusedLoRALinearKernel:
    """The callable registered as ``"lora_linear"``: ``fn(x, W, bias, A, B, scale) -> y`` (differentiable)."""

    def __call__(self, x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
        _check(x, weight, bias, lora_a, lora_b)
        return FusedLoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scale))


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``Y = X Wᵀ + s (X Aᵀ) Bᵀ + bias``: Triton-fused on CUDA, :func:`reference_lora_linear` elsewhere.

    ``weight`` is ``[N, K]`` (``nn.Linear`` layout), ``lora_a`` ``[r, K]``, ``lora_b`` ``[N, r]``; for an adapter
    with ΔW = s · B_eff A_eff pass ``A_eff``, ``B_eff`` (materialised once per step) and ``s``.
    """
    _check(x, weight, bias, lora_a, lora_b)
    fn = kernel_for("lora_linear", x, weight, lora_a, lora_b)
    if fn is None:
        return reference_lora_linear(x, weight, bias, lora_a, lora_b, scale)
    return FusedLoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scale))


class ScaledInputLinearFunction(torch.autograd.Function):
    """``ScaledInputLinearFunction.apply(x, weight, gamma, bias) = x (W diag γ)ᵀ + b`` — an adapter's input-side
    linear reading a folded norm's ŷ (``leantune.memory``: ``W diag γ`` is what it computed on ``u = γ ⊙ ŷ + β``).

    Saves ``x``, ``W`` (a parameter) and ``γ``: never the product ``W diag γ``, which forward and backward form
    again (``dx = dy (W diag γ)``, ``dW = (dyᵀ x) diag γ``; one rounding each, as :func:`scale_columns`)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, bias):
        ctx.save_for_backward(x, weight, gamma)
        ctx.has_bias = bias is not None
        return F.linear(x, scale_columns(weight, gamma), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, gamma = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ scale_columns(weight, gamma)
        if ctx.needs_input_grad[1]:
            g2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_w = scale_columns(g2.t() @ x2.to(g2.dtype), gamma).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_w, None, grad_b


def scaled_input_linear(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor | None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (W diag γ)ᵀ + b`` without saving the product (``F.linear`` when ``gamma`` is None)."""
    if gamma is None:
        return F.linear(x, weight, bias)
    return ScaledInputLinearFunction.apply(x, weight, gamma, bias)


register_kernel("lora_linear", FusedLoRALinearKernel())
