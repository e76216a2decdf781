"""Elementwise part of gated MLPs (SwiGLU / GeGLU) with recomputation in backward.

For a gated MLP ``down(act(e) ⊙ g)`` with ``e = gate(x)``, ``g = up(x)``:

    forward:   h = act(e) ⊙ g                           (nothing but e, g needs to be kept)
    backward:  f = act(e) (recomputed),  h = f ⊙ g (recomputed, needed by down-proj weight/LoRA grads)
               ∂g = ∂h ⊙ f,   ∂e = ∂h ⊙ g ⊙ act'(e)

    act'(e):  SiLU         σ(e) · (1 + e · (1 − σ(e)))
              GELU (erf)   Φ(e) + e · φ(e),  φ(e) = exp(−e²/2)/√(2π)
              GELU (tanh)  ½(1 + t) + ½ e (1 − t²) k0 (1 + 3 k1 e²),  t = tanh(k0 (e + k1 e³)), k0 = √(2/π), k1 = 0.044715

The reference and the Triton kernels compute these formulas in fp32 (``activation`` one of ``"silu"``, ``"gelu"``
(erf) or ``"gelu_tanh"``). When the model's own activation module is known, the CPU path calls it instead (bit-
identical forward) and takes act' from autograd on the recomputed activation. The whole gated MLP with its
projections (:mod:`leantune.kernels.fused_mlp`) uses these pieces for its elementwise part.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from leantune._utils import upcast

from ._triton import next_power_of_2, tl, triton
from .dispatch import kernel_for, register_kernel

_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_BLOCK = 1024


def _check(e: torch.Tensor, g: torch.Tensor, activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"gated_mlp: unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
    if e.shape != g.shape:
        raise ValueError(f"gated_mlp: gate output {tuple(e.shape)} and up output {tuple(g.shape)} must match")


# ----------------------------------------------------------------------------------------------- torch reference


def _act(ef: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(ef)
    return F.gelu(ef, approximate="tanh" if activation == "gelu_tanh" else "none")


def _act_grad(ef: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        s = torch.sigmoid(ef)
        return s * (1 + ef * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(ef * 0.7071067811865476)) + ef * torch.exp(-0.5 * ef * ef) * 0.3989422804014327
    k0, k1 = 0.7978845608028654, 0.044715
    t = torch.tanh(k0 * (ef + k1 * ef**3))
    return 0.5 * (1 + t) + 0.5 * ef * (1 - t * t) * k0 * (1 + 3 * k1 * ef * ef)


def reference_gated_mlp(e: torch.Tensor, g: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Torch reference forward ``h = act(e) ⊙ g`` (fp32 math, cast to e.dtype)."""
    _check(e, g, activation)
    return (_act(upcast(e), activation) * upcast(g)).to(e.dtype)


def reference_gated_mlp_backward(
    grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: str = "silu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference backward → (h recomputed, ∂e, ∂g)."""
    _check(e, g, activation)
    ef, gf, dh = upcast(e), upcast(g), upcast(grad_h)
    f = _act(ef, activation)
    return (f * gf).to(e.dtype), (dh * gf * _act_grad(ef, activation)).to(e.dtype), (dh * f).to(g.dtype)


# ----------------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _activation(e, ACT: tl.constexpr):
    if ACT == 0:
        sig = tl.sigmoid(e)
        f = e * sig
        df = sig * (1.0 + e * (1.0 - sig))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(e * 0.7071067811865476))
        f = e * cdf
        df = cdf + e * tl.exp(-0.5 * e * e) * 0.3989422804014327
    else:
        u = tl.minimum(tl.maximum(0.7978845608028654 * (e + 0.044715 * e * e * e), -20.0), 20.0)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh without libdevice (saturated beyond |u| = 20)
        f = 0.5 * e * (1.0 + t)
        df = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * e * e)
    return f, df


@triton.jit
def _gated_fwd_kernel(E, G, H, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    f, _ = _activation(e, ACT)
    tl.store(H + offs, (f * g).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(DH, E, G, H, DE, DG, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    f, df = _activation(e, ACT)
    tl.store(H + offs, (f * g).to(H.dtype.element_ty), mask=mask)
    tl.store(DE + offs, (dh * g * df).to(DE.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dh * f).to(DG.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[tuple[int], int]:
    block = min(_BLOCK, next_power_of_2(n))
    return (triton.cdiv(n, block),), block


def triton_gated_mlp(e: torch.Tensor, g: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Triton forward ``h = act(e) ⊙ g``; same math as :func:`reference_gated_mlp`."""
    _check(e, g, activation)
    ec, gc = e.contiguous(), g.contiguous()
    h = torch.empty_like(ec)
    if ec.numel():
        grid, block = _grid(ec.numel())
        _gated_fwd_kernel[grid](ec, gc, h, ec.numel(), ACT=_ACTIVATIONS[activation], BLOCK=block)
    return h


def triton_gated_mlp_backward(
    grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: str = "silu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward → (h, ∂e, ∂g) in one pass; same math as :func:`reference_gated_mlp_backward`."""
    _check(e, g, activation)
    dh, ec, gc = grad_h.contiguous(), e.contiguous(), g.contiguous()
    h, de, dg = torch.empty_like(ec), torch.empty_like(ec), torch.empty_like(gc)
    if ec.numel():
        grid, block = _grid(ec.numel())
        _gated_bwd_kernel[grid](dh, ec, gc, h, de, dg, ec.numel(), ACT=_ACTIVATIONS[activation], BLOCK=block)
    return h, de, dg


# ----------------------------------------------------------------------------------------------- the op


def recompute_backward(grad_h: torch.Tensor, e: torch.Tensor, g: torch.Tensor, act_fn: Callable
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU path of the backward for the model's own activation ``act_fn``: recompute ``f = act_fn(e)`` and take
    ``act'`` from autograd (exact for any activation) → (h = f ⊙ g, ∂e = ∂h ⊙ g ⊙ act'(e), ∂g = ∂h ⊙ f)."""
    with torch.enable_grad():
        e_leaf = e.detach().requires_grad_(True)
        f = act_fn(e_leaf)
    (de,) = torch.autograd.grad(f, e_leaf, grad_h * g)
    f = f.detach()
    return f * g, de, grad_h * f


class GatedActivationFunction(torch.autograd.Function):
    """``GatedActivationFunction.apply(e, g, activation, act_fn=None) -> act(e) ⊙ g`` saving only (e, g); act(e) is
    recomputed in backward (exact gradients). With ``act_fn`` (the model's module) the CPU path computes
    ``act_fn(e) * g`` exactly as the model does; Triton on CUDA uses ``activation`` by name."""

    @staticmethod
    def forward(ctx, e: torch.Tensor, g: torch.Tensor, activation: str | None, act_fn: Callable | None = None):
        if activation is not None or act_fn is None:  # None: the model's act_fn has no Triton twin
            _check(e, g, activation)
        use_triton = activation is not None and kernel_for("gated_activation", e, g) is not None
        if use_triton:
            h = triton_gated_mlp(e, g, activation)
        else:
            h = act_fn(e) * g if act_fn is not None else reference_gated_mlp(e, g, activation)
        ctx.save_for_backward(e, g)
        ctx.activation, ctx.act_fn, ctx.use_triton = activation, act_fn, use_triton
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        e, g = ctx.saved_tensors
        if ctx.use_triton:
            _, de, dg = triton_gated_mlp_backward(grad_h, e, g, ctx.activation)
        elif ctx.act_fn is not None:
            _, de, dg = recompute_backward(grad_h, e, g, ctx.act_fn)
        else:
            _, de, dg = reference_gated_mlp_backward(grad_h, e, g, ctx.activation)
        return de, dg, None, None


def gated_activation(e: torch.Tensor, g: torch.Tensor, activation: str | None = "silu",
                     act_fn: Callable | None = None) -> torch.Tensor:
    """``act(e) ⊙ g`` with recompute-in-backward; see :class:`GatedActivationFunction`."""
    return GatedActivationFunction.apply(e, g, activation, act_fn)


register_kernel("gated_activation", triton_gated_mlp)
