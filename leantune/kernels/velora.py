"""VeLoRA-style compressed adapter inputs: rank-1 sub-token projection of what a LoRA-A saves (Miles et al., 2024).

For a LoRA-A matmul ``a = x Aᵀ`` with x of shape [..., D], split every token into G sub-tokens of width D/G:
``x_sub ∈ R^{(…·G) × D/G}``. With a fixed unit vector ``v ∈ R^{D/G}`` (initialised once as the normalised mean of
the first batch's sub-tokens, then frozen) the forward saves only

    z = x_sub · v                       (one scalar per sub-token: D/G times fewer values than x)

and the backward reconstructs ``x̂_sub = z vᵀ`` for the weight gradient:

    dA = scale · daᵀ x̂      (approximate: x projected onto span(v) per sub-token)
       = scale · (daᵀ z) ⊗ v  (computed this way: x̂ is never built)
    dx = da A               (exact; A is a parameter, stored anyway)

The forward output is exact. ``scale`` is VeLoRA's ``velora_scale`` (1.0 by default; their LLaMA script uses 0.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VeLoRAFunction(torch.autograd.Function):
    """``VeLoRAFunction.apply(x, weight, v, num_groups, scale) -> x @ weightᵀ``; saves ``z`` ([..., G]) and ``v``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, v: torch.Tensor, num_groups: int, scale: float):
        out = F.linear(x, weight)
        sub = x.detach().reshape(*x.shape[:-1], num_groups, x.shape[-1] // num_groups)
        z = F.linear(sub, v.to(x.dtype)[None]).squeeze(-1)  # [..., G]; F.linear: faster than a bf16 matvec on CPU
        ctx.save_for_backward(z, v, weight)
        ctx.num_groups, ctx.scale, ctx.x_shape = num_groups, scale, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, v, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # daᵀ x̂ with x̂[t, g·s:(g+1)·s] = z[t, g]·v  equals  (daᵀ z)[:, g] ⊗ v: an [r, G] product replaces the
            # [r, D] one and x̂ is never materialised.
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            coeff = g2.t() @ z.reshape(-1, ctx.num_groups).to(g2.dtype)  # [r, G]
            grad_w = (coeff.unsqueeze(-1) * v.to(coeff.dtype)).reshape(weight.shape).to(weight.dtype) * ctx.scale
        return grad_x, grad_w, None, None, None


class VeLoRAProjection(nn.Module):
    """State of one compressed LoRA-A input: ``num_groups`` G and the frozen unit vector ``v`` (set on first use)."""

    def __init__(self, in_features: int, num_groups: int, scale: float = 1.0):
        super().__init__()
        if num_groups <= 0 or in_features % num_groups:
            raise ValueError(f"VeLoRA: in_features={in_features} is not divisible by num_groups={num_groups}; "
                             "pick a divisor of the layer width")
        self.num_groups, self.scale = num_groups, scale
        self.register_buffer("v", torch.zeros(in_features // num_groups), persistent=False)
        self.initialized = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """``v = normalize(mean of all sub-tokens of x)`` (VeLoRA's ``batch_average_once``)."""
        sub = x.detach().reshape(-1, x.shape[-1] // self.num_groups).to(torch.float32)
        mean = sub.mean(0)
        norm = mean.norm()
        if norm < 1e-12:  # degenerate batch: fall back to the first sub-token direction
            mean, norm = sub[0], sub[0].norm().clamp_min(1e-12)
        self.v.copy_((mean / norm).to(self.v.dtype))
        self.initialized = True

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weightᵀ`` saving only the rank-1 sub-token coefficients."""
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(x, weight)
        if not self.initialized:
            self.initialize(x)
        return VeLoRAFunction.apply(x, weight, self.v, self.num_groups, self.scale)

