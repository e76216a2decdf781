"""Switch leantune kernels on for a built model (peft-wrapped or not) by rebinding instance ``forward``s.

``apply(model)`` rebinds, per module instance (``module.__dict__["forward"]``; ``restore(model)`` deletes them):

* ``"lora_linear"`` — peft ``lora.Linear`` → :func:`~leantune.kernels.lora_linear.fused_lora_linear`
  (Y = X Wᵀ + s (X Aᵀ) Bᵀ + b). Per call it falls back to peft's own forward whenever the fused math would differ:
  merged or disabled adapters, several active adapters, DoRA/other variants, LoRA dropout active in training,
  ``lora_bias``, ``fan_in_fan_out``, a non-``nn.Linear`` (e.g. 4-bit) base, mixed dtypes or extra forward kwargs.
* ``"lowrank_linear"`` — leantune's low-rank tuners (LoRA-XS/SB, DyLoRA, NOLA; ALLoRA only outside training,
  where no custom backward is needed) → the same fused linear with the layer's ``forward_factors`` (scale folded).
* ``"ms_rmsnorm"`` — Llama-style ``*RMSNorm`` (γ ⊙ norm(x), not Gemma's (1+γ)) → γ ⊙ MS-RMSNorm(x).
* ``"ms_layernorm"`` — ``nn.LayerNorm`` over the last dim → γ ⊙ MS-LN(x) + β.
* ``"gated_mlp"`` — modules with ``gate_proj``/``up_proj``/``down_proj``/``act_fn`` (SiLU or GELU) →
  ``down(act(gate(x)) ⊙ up(x))`` with the elementwise part recomputed in backward.
* ``"regelu2"`` / ``"resilu2"`` (opt-in, **approximate gradients**) — standalone GELU / SiLU activation modules →
  exact forward with the Approx-BP step derivative.

The first four are exact (same forward and gradients up to rounding); the default set is those four. With
``enable=None`` kernels are on only if the model has CUDA parameters and Triton is importable, so on a CPU nothing
changes and there is no overhead. Each patched call dispatches with :func:`~leantune.kernels.dispatch.kernel_for`:
Triton for CUDA tensors, the torch reference otherwise.
"""

from __future__ import annotations

import types
from typing import Callable, Iterable

import torch
from torch import nn

from .activations import regelu2, resilu2
from .dispatch import triton_available
from .gated_mlp import gated_activation
from .lora_linear import fused_lora_linear
from .norms import ms_layernorm, ms_rmsnorm

EXACT_KERNELS = ("lora_linear", "lowrank_linear", "ms_rmsnorm", "ms_layernorm", "gated_mlp")
APPROXIMATE_KERNELS = ("regelu2", "resilu2")
ALL_KERNELS = EXACT_KERNELS + APPROXIMATE_KERNELS
_MARK = "_leantune_kernel"

_SILU = ("SiLU", "SiLUActivation")
_GELU_ERF = ("GELUActivation",)
_GELU_TANH = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation")


def activation_kind(act: nn.Module) -> str | None:
    """``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"`` for activation modules whose math the kernels reproduce."""
    name = type(act).__name__
    if name in _SILU:
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name in _GELU_ERF:
        return "gelu"
    if name in _GELU_TANH:
        return "gelu_tanh"
    return None


# ----------------------------------------------------------------------------------------------- patched forwards


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    fused = _fusable_lora_adapter(self, x) if not args and not kwargs else None
    if fused is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b, scaling = fused
    base = self.base_layer
    return fused_lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, scaling)


def _lowrank_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """leantune low-rank tuners: the same fused linear with the method's effective factors (scale folded)."""
    factors = _fusable_lowrank_factors(self, x) if not args and not kwargs else None
    if factors is None:
        return type(self).forward(self, x, *args, **kwargs)
    b_eff, a_eff = factors
    base = self.base_layer
    return fused_lora_linear(x, base.weight, base.bias, a_eff, b_eff, 1.0)


def _fusable_lowrank_factors(layer: nn.Module, x: torch.Tensor):
    if layer.disable_adapters or layer.merged or type(layer.base_layer) is not nn.Linear:
        return None
    active = [name for name in layer.active_adapters if name in layer.r]
    if len(active) != 1:
        return None
    factors = layer.forward_factors(active[0])
    if factors is None:  # e.g. ALLoRA in training: its custom backward must run
        return None
    base = layer.base_layer
    tensors = (base.weight, *factors) + ((base.bias,) if base.bias is not None else ())
    return factors if all(t.dtype == x.dtype for t in tensors) else None


def _fusable_lora_adapter(layer: nn.Module, x: torch.Tensor):
    """(lora_A, lora_B, scaling) when the fused math equals peft's forward for this call, else None."""
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return None
    if not isinstance(dropout, (nn.Identity, nn.Dropout)) or type(layer.base_layer) is not nn.Linear:
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if lora_b.bias is not None or lora_a.bias is not None:
        return None
    weights = (layer.base_layer.weight, lora_a.weight, lora_b.weight)
    if any(w.dtype != x.dtype for w in weights) or (layer.base_layer.bias is not None and layer.base_layer.bias.dtype != x.dtype):
        return None
    return lora_a, lora_b, layer.scaling[name]


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return self.weight * ms_rmsnorm(hidden_states, eps)


def _layernorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    y = ms_layernorm(x, self.eps)
    if self.weight is not None:
        y = y * self.weight
    return y + self.bias if self.bias is not None else y


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), activation_kind(self.act_fn)))


def _approx_gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return regelu2(x, "tanh" if activation_kind(self) == "gelu_tanh" else "none")


def _approx_silu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return resilu2(x)


# ----------------------------------------------------------------------------------------------- module matching


def _is_peft_lora_linear(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # peft is a dependency, but keep the kernels importable without it
        return False
    return isinstance(module, LoraLinear)


def _is_leantune_lowrank(module: nn.Module) -> bool:
    from leantune.adapters.low_rank import LowRankLayer

    return isinstance(module, LowRankLayer)


def _is_llama_rmsnorm(module: nn.Module) -> bool:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        name.endswith("RMSNorm") and "Gemma" not in name  # Gemma scales by (1 + γ)
        and isinstance(weight, torch.Tensor) and weight.dim() == 1
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    )  # fmt: skip


def _is_gated_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
        and isinstance(act, nn.Module) and activation_kind(act) is not None
    )  # fmt: skip


_RULES: dict[str, tuple[Callable[[nn.Module], bool], Callable]] = {
    "lora_linear": (_is_peft_lora_linear, _lora_forward),
    "lowrank_linear": (_is_leantune_lowrank, _lowrank_forward),
    "ms_rmsnorm": (_is_llama_rmsnorm, _rmsnorm_forward),
    "ms_layernorm": (lambda m: type(m) is nn.LayerNorm and len(m.normalized_shape) == 1, _layernorm_forward),
    "gated_mlp": (_is_gated_mlp, _gated_mlp_forward),
    "regelu2": (lambda m: activation_kind(m) in ("gelu", "gelu_tanh"), _approx_gelu_forward),
    "resilu2": (lambda m: activation_kind(m) == "silu", _approx_silu_forward),
}


def _resolve(model: nn.Module, enable: bool | Iterable[str] | None, disable: Iterable[str]) -> list[str]:
    disable = list(disable)
    unknown = [n for n in disable if n not in ALL_KERNELS]
    if enable is None:
        on_cuda = any(p.is_cuda for p in model.parameters())
        names = list(EXACT_KERNELS) if on_cuda and triton_available() else []
    elif enable is True:
        names = list(EXACT_KERNELS)
    elif enable is False:
        names = []
    else:
        names = list(enable)
        unknown += [n for n in names if n not in ALL_KERNELS]
    if unknown:
        raise ValueError(f"leantune.kernels.apply: unknown kernel name(s) {unknown}; known: {list(ALL_KERNELS)}")
    return [n for n in names if n not in disable]


def apply(
    model: nn.Module, enable: bool | Iterable[str] | None = None, disable: Iterable[str] = ()
) -> dict[str, int]:
    """Rebind module forwards of ``model`` to leantune kernels; returns how many modules each kernel patched.

    Args:
        model: any ``nn.Module`` (a transformers model, a peft ``PeftModel``, ...).
        enable: ``None`` — the exact kernels if the model has CUDA parameters and Triton is importable, else none;
            ``True`` — the exact kernels (``EXACT_KERNELS``) on any device (CPU calls use the torch references);
            ``False`` — none (and undoes earlier patches); or an iterable of names from ``ALL_KERNELS``
            (the only way to turn on the approximate ``"regelu2"`` / ``"resilu2"``).
        disable: kernel names to leave off.
    """
    names = _resolve(model, enable, disable)
    restore(model)
    counts = dict.fromkeys(names, 0)
    for module in model.modules():
        if "forward" in module.__dict__:  # someone else (e.g. accelerate hooks) owns this instance's forward
            continue
        for name in names:
            matches, forward = _RULES[name]
            if matches(module):
                module.forward = types.MethodType(forward, module)
                setattr(module, _MARK, name)
                counts[name] += 1
                break
    return counts


def restore(model: nn.Module) -> int:
    """Undo :func:`apply`: drop every rebound ``forward``; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        if getattr(module, _MARK, None) is not None:
            module.__dict__.pop("forward", None)
            delattr(module, _MARK)
            restored += 1
    return restored


def patched_modules(model: nn.Module) -> dict[str, str]:
    """``{qualified module name: kernel name}`` of the modules currently patched by :func:`apply`."""
    return {n: getattr(m, _MARK) for n, m in model.named_modules() if getattr(m, _MARK, None) is not None}
