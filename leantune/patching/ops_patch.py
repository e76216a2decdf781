"""The patches that swap a module's computation for a leantune op without moving weights.

Each ``patch_*(state, applied, site) -> bool`` rebinds one module instance (recording its undo in ``applied``) and
returns False, with a note, when it must leave the module alone (e.g. its ``forward`` belongs to someone else,
such as accelerate's hooks).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn

from leantune._utils import scale_columns
from leantune.kernels.activations import approx_activation
from leantune.kernels.fused_mlp import Projection, fused_gated_mlp, projection_from_module
from leantune.kernels.gated_mlp import gated_activation
from leantune.kernels.lora_linear import fused_lora_linear
from leantune.kernels.norms import ms_norm
from leantune.kernels.velora import VeLoRAProjection

from .folding import norm_eps
from .state import foreign_forward, rebind


def own_call(module: nn.Module) -> Callable:
    """``module``'s class forward, bypassing any instance patch (what the model itself computes)."""
    return functools.partial(type(module).forward, module)


def _foreign(state, applied, module: nn.Module, name: str) -> bool:
    if foreign_forward(module):
        state.note(f"{name}: forward already replaced by someone else; left unchanged")
        return True
    return False


def norm_display_name(kind: str) -> str:
    return "MSLayerNorm" if kind == "layernorm" else "MSRMSNorm"


def patch_norm_unfolded(state, applied, site) -> bool:
    """``γ ⊙ MS-norm(x) (+ β)``: the norm keeps its affine (nothing is folded), the op saves y and rstd."""
    norm = site.norm
    if _foreign(state, applied, norm, site.name):
        return False
    eps, kind = norm_eps(norm), site.op_kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ms_norm(x, eps, kind)
        if self.weight is not None:
            y = self.weight * y
        bias = getattr(self, "bias", None)
        return y if bias is None else y + bias

    rebind(applied, norm, forward, norm_display_name(kind), f"{norm.weight.shape[0]}, eps={eps}, affine after the op",
           state=state)
    return True


def patch_activation(state, applied, site) -> bool:
    """Exact forward, 2-bit step-derivative backward (ReGELU2 / ReSiLU2)."""
    module = site.module
    if _foreign(state, applied, module, site.name):
        return False
    original = own_call(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_activation(x, site.kind, site.approximate, original)

    name = "ReSiLU2" if site.kind == "silu" else "ReGELU2"
    rebind(applied, module, forward, name, f"forward={type(module).__name__}", state=state)
    return True


def patch_gated_mlp(state, applied, site) -> bool:
    """The whole gated MLP as one op saving (x, e, g); with projections it cannot read (quantized, other adapter
    types) each call falls back to the elementwise op (saves e, g; act(e) recomputed). Both are exact."""
    mlp = site.mlp
    if _foreign(state, applied, mlp, site.name):
        return False
    act = own_call(site.act)
    activation = site.activation
    original = own_call(mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return original(x)
        out = fused_gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, act, activation)
        if out is not None:
            return out
        return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), activation, act))

    rebind(applied, mlp, forward, "FusedGatedMLP", state=state)
    return True


def _fusable_lora(layer: nn.Module, x: torch.Tensor) -> Projection | None:
    """The peft LoRA layer as one :class:`~leantune.kernels.fused_mlp.Projection` with a single adapter when the
    fused linear computes its forward exactly for this call (one active adapter, no dropout in training, no
    ``lora_bias`` or variant, ``nn.Linear`` base, one dtype), else None."""
    if getattr(layer, "fan_in_fan_out", False) or layer.disable_adapters:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    dropout = layer.lora_dropout[active[0]]
    if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return None
    projection, _ = projection_from_module(layer)
    if projection is None or len(projection.loras) != 1:
        return None
    tensors = (projection.weight, *projection.loras[0][:2]) + ((projection.bias,) if projection.bias is not None else ())
    return projection if all(t.dtype == x.dtype for t in tensors) else None


def _fusable_lowrank(layer: nn.Module, x: torch.Tensor):
    """(B_eff, A_eff) of a leantune low-rank layer when the fused linear computes its forward exactly, else None."""
    if layer.disable_adapters or layer.merged or type(layer.base_layer) is not nn.Linear or layer.input_affine:
        return None
    active = [name for name in layer.active_adapters if name in layer.r]
    if len(active) != 1:
        return None
    factors = layer.forward_factors(active[0])
    if factors is None:  # the method runs its own autograd function (ALLoRA, NOLA in training)
        return None
    base = layer.base_layer
    tensors = (base.weight, *factors) + ((base.bias,) if base.bias is not None else ())
    return factors if all(t.dtype == x.dtype for t in tensors) else None


def patch_adapter_linear(state, applied, site) -> bool:
    """peft LoRA ``Linear`` / leantune low-rank layers → the fused adapter linear (Y = X Wᵀ + s (X Aᵀ) Bᵀ + b),
    per call falling back to the layer's own forward when the fused math would differ."""
    name, layer = site
    if _foreign(state, applied, layer, name):
        return False
    lowrank = not hasattr(layer, "lora_A")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fusable = None if args or kwargs else (_fusable_lowrank if lowrank else _fusable_lora)(self, x)
        if fusable is None:
            return type(self).forward(self, x, *args, **kwargs)
        if lowrank:
            b_eff, a_eff = fusable
            return fused_lora_linear(x, self.base_layer.weight, self.base_layer.bias, a_eff, b_eff, 1.0)
        (lora_a, lora_b, scaling), = fusable.loras
        if fusable.gamma is not None:  # a folded norm's γ: the kernel takes A diag γ (formed here)
            lora_a = scale_columns(lora_a, fusable.gamma)
        return fused_lora_linear(x, fusable.weight, fusable.bias, lora_a, lora_b, scaling)

    rebind(applied, layer, forward, "FusedLowRankLinear" if lowrank else "FusedLoRALinear", state=state)
    return True


def patch_velora(state, applied, site) -> bool:
    """VeLoRA: every LoRA-A of this linear saves one scalar per sub-token instead of its input."""
    name, module = site
    lora_a = getattr(module, "lora_A", None)
    if not lora_a:
        state.note(f"{name}: no peft LoRA adapter, VeLoRA not applied")
        return False
    config = state.memory
    count = 0
    for adapter, linear in lora_a.items():
        if _foreign(state, applied, linear, f"{name}.lora_A.{adapter}"):
            continue
        in_features = linear.weight.shape[1]
        groups = math.gcd(in_features, config.velora_num_groups)
        projection = VeLoRAProjection(in_features, groups, config.velora_scale).to(linear.weight.device)

        def forward(self, x, projection=projection):
            return projection.linear(x, self.weight)

        rebind(applied, linear, forward, "VeLoRALinear", f"{in_features}, groups={groups}", state=state)
        count += 1
    applied.count = count
    return count > 0
