"""Exact fused gated MLP (SwiGLU / GeGLU) with LoRA on gate/up/down, saving only (x, e, g).

Forward (the ops and order of Hugging Face ``LlamaMLP`` with peft LoRA layers, so the CPU outputs are bit-identical):

    P(u) = u Wᵀ + b + Σ_k s_k · (u_k A_kᵀ) B_kᵀ           (u_k = u cast to A_k's dtype, as peft does)
    e = P_gate(x),  g = P_up(x),  h = act(e) ⊙ g,  out = P_down(h)

Saved for backward: ``x`` (usually the norm output, already shared), ``e`` and ``g``; eager HF + peft keeps x, e,
act(e), g and h. Backward, per projection with input u and upstream gradient dr:

    dh = dout W_down + Σ s (dout B) A                       (needs no h)
    (h, de, dg) = the elementwise backward (:mod:`.gated_mlp`), recomputing act(e) and h
    du = dr W + Σ_k s_k (dr B_k) A_k,   dW = drᵀ u,   db = Σ_rows dr,
    dB_k = s_k drᵀ (u_k A_kᵀ),          dA_k = s_k (dr B_k)ᵀ u_k

One autograd function, :class:`GatedMLPFunction`, for ``leantune.memory``'s fused MLP and the kernels patch. The
projection GEMMs are library GEMMs on every device; the elementwise part is the Triton kernel on CUDA (``activation``
by name) and, on CPU, the model's own activation module with act' from autograd (exact for any activation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from leantune._utils import scale_columns

from .dispatch import kernel_for, register_kernel
from .gated_mlp import recompute_backward, triton_gated_mlp, triton_gated_mlp_backward


@dataclass
class Projection:
    """A linear layer plus its active LoRA branches: ``weight`` [out, in], ``bias``, ``loras`` = [(A, B, s)], and
    ``gamma``: a folded norm's γ its LoRA-As read through (``A diag γ``, formed on the fly, never saved), or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    loras: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    gamma: torch.Tensor | None = None


@dataclass
class GatedMLPSpec:
    """Static description of one call: ``act_fn`` (the model's activation, CPU path), ``activation`` ("silu", "gelu",
    "gelu_tanh" or None: no Triton path), which projection has a bias, the LoRA scalings of gate, up, down, and their
    input scales γ (see :class:`Projection`; constants, kept here rather than saved as inputs)."""

    act_fn: Callable
    activation: str | None
    has_bias: tuple[bool, bool, bool]
    lora_scalings: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]
    gammas: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)


def projection_from_module(module: nn.Module) -> tuple[Projection | None, str]:
    """Read weights of an ``nn.Linear`` or a peft LoRA ``Linear`` around one; ``(None, reason)`` if unsupported.

    A LoRA layer reading a folded norm's ŷ (``leantune.memory``; its ``_leantune_input_affine`` holds ``(γ, β)``)
    gives ``A diag γ`` as its LoRA-A and ``s · B (A β)`` added to the bias, both formed here from the weights
    (differentiable), so the projection computes exactly what the layer computes.
    """
    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        if type(base) is not nn.Linear:
            return None, f"base layer {type(base).__name__} is not nn.Linear"
        if module.merged:
            return None, "adapter weights are merged"
        projection = Projection(base.weight, base.bias)
        if module.disable_adapters:
            return projection, ""
        affine = module.__dict__.get("_leantune_input_affine")
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
                return None, f"adapter {name!r} uses a LoRA variant (e.g. DoRA)"
            dropout = module.lora_dropout[name]
            if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and
                                                                (dropout.p == 0 or not dropout.training)):
                return None, f"adapter {name!r} has lora_dropout > 0"
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            if lora_b.bias is not None:
                return None, f"adapter {name!r} has lora_bias=True"
            a, scaling = lora_a.weight, float(module.scaling[name])
            if affine is not None:
                gamma, beta = affine
                if beta is not None:
                    row = beta.to(device=a.device, dtype=a.dtype)[None]  # a row: F.linear squeezes a vector's
                    shift = F.linear(F.linear(row, a), lora_b.weight)[0] * scaling  # output in place (SAC refuses)
                    shift = shift.to(base.weight.dtype)
                    projection.bias = shift if projection.bias is None else projection.bias + shift
                projection.gamma = gamma.to(device=a.device)
            elif "forward" in lora_a.__dict__:
                return None, f"adapter {name!r} has a patched LoRA-A (e.g. VeLoRA)"
            projection.loras.append((a, lora_b.weight, scaling))
        return projection, ""
    if type(module) is nn.Linear:
        return Projection(module.weight, module.bias), ""
    return None, f"{type(module).__name__} is neither nn.Linear nor a peft LoRA Linear"


def flatten_projections(projections: list[Projection]) -> list[torch.Tensor]:
    """``[W_gate, (b_gate), A.., B.., W_up, ..., W_down, ...]`` in the order :class:`GatedMLPSpec` describes."""
    flat: list[torch.Tensor] = []
    for p in projections:
        flat.append(p.weight)
        if p.bias is not None:
            flat.append(p.bias)
        for a, b, _ in p.loras:
            flat.extend((a, b))
    return flat


def unflatten_projections(spec: GatedMLPSpec, tensors: tuple[torch.Tensor, ...]) -> list[Projection]:
    """Inverse of :func:`flatten_projections` for gate, up, down."""
    out, i = [], 0
    for has_bias, scalings, gamma in zip(spec.has_bias, spec.lora_scalings, spec.gammas):
        weight, i = tensors[i], i + 1
        bias = None
        if has_bias:
            bias, i = tensors[i], i + 1
        loras = []
        for s in scalings:
            loras.append((tensors[i], tensors[i + 1], float(s)))
            i += 2
        out.append(Projection(weight, bias, loras, gamma))
    if i != len(tensors):
        raise ValueError(f"gated MLP: spec describes {i} tensors but {len(tensors)} were passed")
    return out


def project(u: torch.Tensor, p: Projection) -> torch.Tensor:
    """Exactly peft's ``lora.Linear.forward`` (or ``F.linear`` without adapters)."""
    result = F.linear(u, p.weight, p.bias)
    if not p.loras:
        return result
    result_dtype = result.dtype
    for a, b, s in p.loras:
        uk = u if u.dtype == a.dtype else u.to(a.dtype)
        a = a if p.gamma is None else scale_columns(a, p.gamma)
        result = result + F.linear(F.linear(uk, a), b) * s
    return result.to(result_dtype)


def project_backward(u: torch.Tensor | None, p: Projection, dr: torch.Tensor, need_input: bool,
                     need_params: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(du, [dW, (db), dA_1, dB_1, ...]) of :func:`project`, None where no gradient is needed; ``u`` may be None
    when ``need_params`` is False."""
    dr2 = dr.reshape(-1, dr.shape[-1])
    u2 = u.reshape(-1, u.shape[-1]) if u is not None else None
    du = dr2 @ p.weight if need_input else None
    grads: list[torch.Tensor | None] = []
    if need_params:
        grads.append((dr2.t() @ u2.to(dr2.dtype)).to(p.weight.dtype) if p.weight.requires_grad else None)
        if p.bias is not None:
            grads.append(dr2.sum(0).to(p.bias.dtype) if p.bias.requires_grad else None)
    for a, b, s in p.loras:
        a_eff = a if p.gamma is None else scale_columns(a, p.gamma)
        drb = dr2.to(b.dtype) * s  # gradient reaching lora_B's output
        d_mid = drb @ b
        if need_params:
            uk = u2 if u2.dtype == a.dtype else u2.to(a.dtype)
            grad_a = d_mid.t() @ uk if a.requires_grad else None
            if grad_a is not None and p.gamma is not None:
                grad_a = scale_columns(grad_a, p.gamma)  # chain rule through A diag γ
            grads.append(grad_a)
            grads.append(drb.t() @ (uk @ a_eff.t()) if b.requires_grad else None)
        if need_input:
            du = du + (d_mid @ a_eff).to(du.dtype)
    return du, grads


class GatedMLPFunction(torch.autograd.Function):
    """``GatedMLPFunction.apply(x, spec, *tensors) -> out``; saves ``(x, e, g)`` (plus the weights, which are
    parameters and cost nothing extra)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: GatedMLPSpec, *tensors: torch.Tensor):
        gate, up, down = unflatten_projections(spec, tensors)
        use_triton = spec.activation is not None and kernel_for("gated_mlp", x) is not None
        e, g = project(x, gate), project(x, up)
        h = triton_gated_mlp(e, g, spec.activation) if use_triton else spec.act_fn(e) * g
        ctx.save_for_backward(x, e, g, *tensors)
        ctx.spec, ctx.use_triton = spec, use_triton
        return project(h, down)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, e, g, *tensors = ctx.saved_tensors
        spec = ctx.spec
        gate, up, down = unflatten_projections(spec, tuple(tensors))
        dh, _ = project_backward(None, down, grad_out, need_input=True, need_params=False)
        dh = dh.view(e.shape).to(e.dtype)
        if ctx.use_triton:
            h, de, dg = triton_gated_mlp_backward(dh, e, g, spec.activation)
        else:
            h, de, dg = recompute_backward(dh, e, g, spec.act_fn)
        _, down_grads = project_backward(h, down, grad_out, need_input=False)
        need_x = ctx.needs_input_grad[0]
        dx_gate, gate_grads = project_backward(x, gate, de, need_x)
        dx_up, up_grads = project_backward(x, up, dg, need_x)
        dx = (dx_gate + dx_up).view(x.shape).to(x.dtype) if need_x else None
        return (dx, None, *gate_grads, *up_grads, *down_grads)


def fused_gated_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn: Callable,
                    activation: str | None = None) -> torch.Tensor | None:
    """``down(act(gate(x)) * up(x))`` through :class:`GatedMLPFunction`; ``None`` if a projection is unsupported
    (see :func:`unsupported_reason`; then the caller runs its eager forward)."""
    projections = []
    for module in (gate, up, down):
        projection, _reason = projection_from_module(module)
        if projection is None:
            return None
        projections.append(projection)
    spec = GatedMLPSpec(
        act_fn=act_fn, activation=activation,
        has_bias=tuple(p.bias is not None for p in projections),
        lora_scalings=tuple(tuple(s for _, _, s in p.loras) for p in projections),
        gammas=tuple(p.gamma for p in projections),
    )
    return GatedMLPFunction.apply(x, spec, *flatten_projections(projections))


def unsupported_reason(gate: nn.Module, up: nn.Module, down: nn.Module) -> str:
    """Why :func:`fused_gated_mlp` would refuse these projections ('' if it would not)."""
    for label, module in (("gate", gate), ("up", up), ("down", down)):
        projection, reason = projection_from_module(module)
        if projection is None:
            return f"{label}: {reason}"
    return ""


register_kernel("gated_mlp", triton_gated_mlp)
