"""Whole gated MLP with LoRA projections, saving only (x, e, g): the ``"gated_mlp"`` kernel of ``leantune.memory``.

For projections P(u) = u Wᵀ + b + Σ_k s_k (u A_kᵀ) B_kᵀ and e = P_gate(x), g = P_up(x), out = P_down(act(e) ⊙ g):

    forward:   e, g (library GEMMs) → h = act(e) ⊙ g (Triton) → out = P_down(h)
    backward:  dh = dout W_down + Σ s (dout B) A              (needs no h)
               (h, de, dg) = one Triton pass recomputing act(e) and h
               per projection with input u, upstream dr:  du = dr W + Σ_k s_k (dr B_k) A_k,  dW = drᵀ u,
               db = Σ_rows dr,  dA_k = s_k (dr B_k)ᵀ u,  dB_k = s_k drᵀ (u A_kᵀ)

Contract (``leantune.memory.gated_mlp.GatedMLPFunction``): the registered object has ``forward(ctx, x, spec,
*tensors) -> out`` and ``backward(ctx, grad_out) -> (grad_x, None, *grad_tensors)``; ``spec`` carries
``activation`` ("silu" | "gelu" | "gelu_tanh"), ``has_bias`` (3 bools) and ``lora_scalings`` (3 tuples), and
``tensors`` is flat ``[W_gate, (b_gate), A_1, B_1, ..., W_up, ..., W_down, ...]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import register_kernel
from .gated_mlp import triton_gated_mlp, triton_gated_mlp_backward

Projection = tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor, float]]]


def unflatten_projections(spec, tensors: tuple[torch.Tensor, ...]) -> list[Projection]:
    """Split the flat tensor list into (W, bias, [(A, B, s), ...]) for gate, up, down."""
    out, i = [], 0
    for has_bias, scalings in zip(spec.has_bias, spec.lora_scalings):
        weight, i = tensors[i], i + 1
        bias = None
        if has_bias:
            bias, i = tensors[i], i + 1
        loras = []
        for s in scalings:
            loras.append((tensors[i], tensors[i + 1], float(s)))
            i += 2
        out.append((weight, bias, loras))
    if i != len(tensors):
        raise ValueError(f"gated_mlp kernel: spec describes {i} tensors but {len(tensors)} were passed")
    return out


def project(u: torch.Tensor, proj: Projection) -> torch.Tensor:
    """``u Wᵀ + b + Σ s (u Aᵀ) Bᵀ`` (peft's order of operations)."""
    weight, bias, loras = proj
    result = F.linear(u, weight, bias)
    result_dtype = result.dtype
    for a, b, s in loras:
        uk = u if u.dtype == a.dtype else u.to(a.dtype)
        result = result + F.linear(F.linear(uk, a), b) * s
    return result.to(result_dtype)


def project_backward(
    u: torch.Tensor | None, proj: Projection, dr: torch.Tensor, need_input: bool, need_params: bool = True
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(du, [dW, (db), dA_1, dB_1, ...]) of :func:`project`; ``u`` may be None if ``need_params`` is False."""
    weight, bias, loras = proj
    dr2 = dr.reshape(-1, dr.shape[-1])
    u2 = u.reshape(-1, u.shape[-1]) if u is not None else None
    du = dr2 @ weight if need_input else None
    grads: list[torch.Tensor | None] = []
    if need_params:
        grads.append((dr2.t() @ u2.to(dr2.dtype)).to(weight.dtype) if weight.requires_grad else None)
        if bias is not None:
            grads.append(dr2.sum(0).to(bias.dtype) if bias.requires_grad else None)
    for a, b, s in loras:
        drb = dr2.to(b.dtype) * s
        d_mid = drb @ b
        if need_params:
            uk = u2 if u2.dtype == a.dtype else u2.to(a.dtype)
            grads.append(d_mid.t() @ uk if a.requires_grad else None)
            grads.append(drb.t() @ (uk @ a.t()) if b.requires_grad else None)
        if need_input:
            du = du + (d_mid @ a).to(du.dtype)
    return du, grads


class FusedGatedMLPKernel:
    """The object registered as ``"gated_mlp"`` (contract in the module docstring)."""

    def forward(self, ctx, x: torch.Tensor, spec, *tensors: torch.Tensor) -> torch.Tensor:
        gate, up, down = unflatten_projections(spec, tensors)
        e, g = project(x, gate), project(x, up)
        h = triton_gated_mlp(e, g, spec.activation)
        ctx.save_for_backward(x, e, g, *tensors)
        ctx.leantune_spec = spec
        return project(h, down)

    def backward(self, ctx, grad_out: torch.Tensor):
        x, e, g, *tensors = ctx.saved_tensors
        spec = ctx.leantune_spec
        gate, up, down = unflatten_projections(spec, tuple(tensors))
        dh, _ = project_backward(None, down, grad_out, need_input=True, need_params=False)
        h, de, dg = triton_gated_mlp_backward(dh.view(e.shape).to(e.dtype), e, g, spec.activation)
        _, down_grads = project_backward(h, down, grad_out, need_input=False)
        need_x = ctx.needs_input_grad[0]
        dx_gate, gate_grads = project_backward(x, gate, de, need_x)
        dx_up, up_grads = project_backward(x, up, dg, need_x)
        dx = (dx_gate + dx_up).view(x.shape).to(x.dtype) if need_x else None
        return (dx, None, *gate_grads, *up_grads, *down_grads)


register_kernel("gated_mlp", FusedGatedMLPKernel())
