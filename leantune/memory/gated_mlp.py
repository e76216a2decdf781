"""Exact fused gated MLP (SwiGLU / GeGLU) with LoRA on gate/up/down, saving only (x, e, g).

Forward (identical ops and order to HF ``LlamaMLP`` with peft LoRA layers, so outputs are bit-identical):

    P(u) = u Wᵀ + b + Σ_k s_k · (u_k A_kᵀ) B_kᵀ           (u_k = u cast to A_k's dtype, as peft does)
    e = P_gate(x),  g = P_up(x),  h = act(e) ⊙ g,  out = P_down(h)

Saved for backward: ``x`` (usually the norm output, already shared), ``e`` and ``g``. Backward recomputes
``act(e)`` and ``h`` and applies, for each projection with upstream gradient ``dr``:

    du = dr W + Σ_k s_k (dr B_k) A_k,   dW = drᵀ u,   db = Σ_rows dr,
    dB_k = s_k drᵀ (u_k A_kᵀ),          dA_k = s_k (dr B_k)ᵀ u_k,

with ``dh = dout-side du``, ``de = dh ⊙ g ⊙ act'(e)``, ``dg = dh ⊙ act(e)`` (act' by autograd on the recomputed
activation, so every activation the model uses is exact). Eager HF + peft keeps x, e, act(e), g and h.

Kernel contract (``kernel_for("gated_mlp", x)``): an autograd-Function-like object with static
``forward(ctx, x, spec, *tensors)`` and ``backward(ctx, grad_out)`` returning ``(grad_x, None, *grad_tensors)``,
where ``spec`` is a :class:`GatedMLPSpec` and ``tensors`` is the flat list built by :func:`flatten_projections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leantune.kernels.dispatch import kernel_for


@dataclass
class Projection:
    """A linear layer plus its active LoRA branches: ``weight`` [out, in], ``bias``, ``loras`` = [(A, B, s)]."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    loras: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)


@dataclass
class GatedMLPSpec:
    """Static description of one fused call: activation (``act_fn`` for the torch path; ``activation`` one of
    "silu", "gelu", "gelu_tanh" or None for kernels), which projection has a bias, LoRA counts and scalings."""

    act_fn: Callable
    activation: str | None
    has_bias: tuple[bool, bool, bool]
    lora_scalings: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]


def projection_from_module(module: nn.Module) -> tuple[Projection | None, str]:
    """Read weights of an ``nn.Linear`` or a peft LoRA ``Linear`` around one; ``(None, reason)`` if unsupported."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        if type(base) is not nn.Linear:
            return None, f"base layer {type(base).__name__} is not nn.Linear"
        if module.merged:
            return None, "adapter weights are merged"
        projection = Projection(base.weight, base.bias)
        if module.disable_adapters:
            return projection, ""
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
                return None, f"adapter {name!r} uses a LoRA variant (e.g. DoRA)"
            dropout = module.lora_dropout[name]
            if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and
                                                                (dropout.p == 0 or not dropout.training)):
                return None, f"adapter {name!r} has lora_dropout > 0"
            lora_b = module.lora_B[name]
            if lora_b.bias is not None:
                return None, f"adapter {name!r} has lora_bias=True"
            projection.loras.append((module.lora_A[name].weight, lora_b.weight, float(module.scaling[name])))
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


def _unflatten(spec: GatedMLPSpec, tensors: tuple) -> list[Projection]:
    out, i = [], 0
    for has_bias, scalings in zip(spec.has_bias, spec.lora_scalings):
        w = tensors[i]
        i += 1
        b = None
        if has_bias:
            b, i = tensors[i], i + 1
        loras = []
        for s in scalings:
            loras.append((tensors[i], tensors[i + 1], s))
            i += 2
        out.append(Projection(w, b, loras))
    return out


def _project(u: torch.Tensor, p: Projection) -> torch.Tensor:
    """Exactly peft's ``lora.Linear.forward`` (or ``F.linear`` without adapters)."""
    result = F.linear(u, p.weight, p.bias)
    if not p.loras:
        return result
    result_dtype = result.dtype
    for a, b, s in p.loras:
        uk = u if u.dtype == a.dtype else u.to(a.dtype)
        result = result + F.linear(F.linear(uk, a), b) * s
    return result.to(result_dtype)


def _project_backward(u: torch.Tensor, p: Projection, dr: torch.Tensor, need_input_grad: bool
                      ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of :func:`_project`: (du, [dW, (db), dA_1, dB_1, ...]) with None where no grad is needed."""
    u2, dr2 = u.reshape(-1, u.shape[-1]), dr.reshape(-1, dr.shape[-1])
    grads: list[torch.Tensor | None] = []
    du = dr2 @ p.weight if need_input_grad else None
    grads.append((dr2.t() @ u2.to(dr2.dtype)).to(p.weight.dtype) if p.weight.requires_grad else None)
    if p.bias is not None:
        grads.append(dr2.sum(0).to(p.bias.dtype) if p.bias.requires_grad else None)
    for a, b, s in p.loras:
        uk = u2 if u2.dtype == a.dtype else u2.to(a.dtype)
        g_b = dr2.to(b.dtype) * s  # gradient reaching lora_B's output
        mid = uk @ a.t()
        d_mid = g_b @ b
        grads.append((d_mid.t() @ uk) if a.requires_grad else None)
        grads.append((g_b.t() @ mid) if b.requires_grad else None)
        if need_input_grad:
            du = du + (d_mid @ a).to(du.dtype)
    if du is not None:
        du = du.view(*u.shape[:-1], du.shape[-1]).to(u.dtype)
    return du, grads


class GatedMLPFunction(torch.autograd.Function):
    """``GatedMLPFunction.apply(x, spec, *tensors) -> out``; saves ``(x, e, g)`` (plus the weights, which are
    parameters and cost nothing extra)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: GatedMLPSpec, *tensors: torch.Tensor):
        kernel = kernel_for("gated_mlp", x) if spec.activation is not None else None
        ctx.kernel = kernel
        if kernel is not None:
            return kernel.forward(ctx, x, spec, *tensors)
        gate, up, down = _unflatten(spec, tensors)
        e = _project(x, gate)
        g = _project(x, up)
        h = spec.act_fn(e) * g
        out = _project(h, down)
        ctx.spec = spec
        ctx.save_for_backward(x, e, g, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.kernel is not None:
            return ctx.kernel.backward(ctx, grad_out)
        x, e, g, *tensors = ctx.saved_tensors
        gate, up, down = _unflatten(ctx.spec, tuple(tensors))
        with torch.enable_grad():
            e_leaf = e.detach().requires_grad_(True)
            act = ctx.spec.act_fn(e_leaf)
        h = act.detach() * g
        dh, down_grads = _project_backward(h, down, grad_out, need_input_grad=True)
        (de,) = torch.autograd.grad(act, e_leaf, dh * g)
        dg = dh * act.detach()
        need_x = ctx.needs_input_grad[0]
        dx_gate, gate_grads = _project_backward(x, gate, de, need_x)
        dx_up, up_grads = _project_backward(x, up, dg, need_x)
        dx = dx_gate + dx_up if need_x else None
        return (dx, None, *gate_grads, *up_grads, *down_grads)


def fused_gated_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn: Callable,
                    activation: str | None = None) -> torch.Tensor | None:
    """``down(act(gate(x)) * up(x))`` through :class:`GatedMLPFunction`; ``None`` if a projection is unsupported
    (then the caller runs its eager forward)."""
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
    )
    return GatedMLPFunction.apply(x, spec, *flatten_projections(projections))


def unsupported_reason(gate: nn.Module, up: nn.Module, down: nn.Module) -> str:
    """Why :func:`fused_gated_mlp` would refuse these projections ('' if it would not)."""
    for label, module in (("gate", gate), ("up", up), ("down", down)):
        projection, reason = projection_from_module(module)
        if projection is None:
            return f"{label}: {reason}"
    return ""
