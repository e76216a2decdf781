"""The places in a model that leantune can patch ("sites"), found from the architecture table and module types.

* norms — from :data:`leantune.architectures.ARCHITECTURES` with the linears they feed (foldable), plus every other
  norm module by type (``nn.LayerNorm``, ``*RMSNorm``), which can only take the unfolded MS norm;
* activations — every GELU/SiLU module whose math a 2-bit surrogate covers (:func:`activation_kind`);
* gated MLPs — modules with ``gate_proj``, ``up_proj``, ``down_proj`` and a known ``act_fn``;
* adapter linears — peft LoRA ``Linear`` and leantune ``LowRankLayer`` modules (the fused adapter linear);
* VeLoRA roles — the LoRA-A inputs of the ``attention_output`` / ``ffn_output`` linears of the table.

Paths are relative to each block, so peft wrappers (``base_model.model.`` prefixes, tuner layers around the
linears) do not matter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from leantune.architectures import ARCHITECTURES, blocks_of, find_layer_stack, get_path, hf_model, model_type_of


@dataclass
class NormSite:
    """A norm; ``consumers`` are the linears reading its output (empty: it cannot be folded)."""

    name: str
    norm: nn.Module
    kind: str  # "layernorm", "rmsnorm", "gemma" (scales by 1 + w)
    consumers: list[tuple[str, nn.Module]] = field(default_factory=list)
    post_norm: bool = False
    is_final: bool = False

    @property
    def op_kind(self) -> str:
        """The MS-norm op's kind ("layernorm" or "rmsnorm")."""
        return "layernorm" if self.kind == "layernorm" else "rmsnorm"


@dataclass
class ActivationSite:
    name: str
    module: nn.Module
    kind: str  # "gelu" | "silu"
    approximate: str | None  # "none" | "tanh": F.gelu form; None: keep the module's own forward


@dataclass
class GatedMLPSite:
    name: str
    mlp: nn.Module
    act: nn.Module
    activation: str | None  # Triton name ("silu", "gelu", "gelu_tanh") or None (no Triton path)


@dataclass
class Sites:
    model_type: str | None
    known: bool  # the architecture table has an entry with norm folding
    norms: list[NormSite] = field(default_factory=list)
    activations: list[ActivationSite] = field(default_factory=list)
    gated_mlps: list[GatedMLPSite] = field(default_factory=list)
    adapter_linears: list[tuple[str, nn.Module]] = field(default_factory=list)
    velora: dict[str, list[tuple[str, nn.Module]]] = field(default_factory=dict)  # role -> linears
    causal_lm: nn.Module | None = None  # the …ForCausalLM whose LM-head loss can be chunked
    layer_stack: nn.ModuleList | None = None  # the decoder layers (the activation budget's unit)
    notes: list[str] = field(default_factory=list)


_TRITON_ACTIVATION = {("silu", "none"): "silu", ("gelu", "none"): "gelu", ("gelu", "tanh"): "gelu_tanh"}


def activation_kind(module: nn.Module) -> tuple[str, str | None] | None:
    """``("gelu" | "silu", approximate)`` for GELU/SiLU modules, None otherwise. ``approximate`` is "none"/"tanh"
    when the module computes exactly ``F.gelu(approximate=...)``/``F.silu``, and None when it has its own formula
    (GPT-2's ``NewGELUActivation``…): then its forward is kept and only the backward is replaced."""
    name = type(module).__name__
    if isinstance(module, nn.SiLU) or name == "SiLUActivation":
        return "silu", "none"
    if isinstance(module, nn.GELU):
        return "gelu", module.approximate
    if name == "GELUActivation":
        return "gelu", "none" if getattr(module, "act", None) is F.gelu else None
    if name in ("GELUTanh", "PytorchGELUTanh"):
        act = getattr(module, "act", None)
        exact_tanh = isinstance(act, functools.partial) and act.keywords.get("approximate") == "tanh"
        return "gelu", "tanh" if exact_tanh else None
    if name in ("NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation"):
        return "gelu", None
    return None


def triton_activation(kind: tuple[str, str | None] | None) -> str | None:
    """The Triton kernels' name of an :func:`activation_kind`, None when they do not compute it exactly."""
    return _TRITON_ACTIVATION.get(kind) if kind is not None else None


def generic_norm_kind(module: nn.Module) -> str | None:
    """Norm kind of a norm module recognised by its type (outside the table), None if not a supported norm."""
    if isinstance(module, nn.LayerNorm):
        ok = len(module.normalized_shape) == 1 and module.weight is not None
        return "layernorm" if ok else None
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    has_eps = hasattr(module, "variance_epsilon") or hasattr(module, "eps")
    if name.endswith("RMSNorm") and getattr(weight, "dim", lambda: 0)() == 1 and has_eps:
        return "gemma" if "Gemma" in name else "rmsnorm"
    return None


@runtime_checkable
class LowRankAdapter(Protocol):
    """What the patcher asks of an adapter layer that is not peft's LoRA (leantune's ``adapters.low_rank.
    LowRankLayer`` implements it): its factors for the fused linear, and an input affine for folded norms. The patcher
    sits below the adapters (ARCHITECTURE.md), so it knows this contract, not the adapter classes."""

    def forward_factors(self, adapter: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_input_affine(self, gamma: torch.Tensor, beta: Optional[torch.Tensor]) -> None: ...

    def clear_input_affine(self) -> None: ...


def is_lowrank_adapter(module: nn.Module) -> bool:
    """A peft tuner layer that implements :class:`LowRankAdapter` (a leantune low-rank layer)."""
    return isinstance(module, BaseTunerLayer) and isinstance(module, LowRankAdapter)


def is_adapter_linear(module: nn.Module) -> bool:
    """peft LoRA ``Linear`` or a :class:`LowRankAdapter` layer: the fused adapter linear applies."""
    return isinstance(module, LoraLinear) or is_lowrank_adapter(module)


def _table_norms(model: nn.Module, sites: Sites) -> None:
    architecture = ARCHITECTURES[sites.model_type]
    for entry in architecture.blocks:
        blocks = blocks_of(model, entry)
        for index, (block_name, block) in enumerate(blocks):
            for norm_entry in entry.norms:
                if norm_entry.next_block:
                    if index + 1 == len(blocks):
                        continue  # the last block's norm feeds the pooler/head: keeps its affine
                    owner_name, owner = blocks[index + 1]
                else:
                    owner_name, owner = block_name, block
                norm = get_path(block, norm_entry.path)
                consumers = None
                for candidate in norm_entry.consumers:
                    found = [(f"{owner_name}.{p}", get_path(owner, p)) for p in candidate]
                    if all(m is not None for _, m in found):
                        consumers = found
                        break
                if norm is None or consumers is None:
                    sites.notes.append(f"{block_name}.{norm_entry.path}: expected modules not found; norm not folded")
                    continue
                sites.norms.append(NormSite(f"{block_name}.{norm_entry.path}", norm, architecture.norm_kind,
                                            consumers, norm_entry.post_norm))
            for role, path in (("attn_out", entry.attention_output), ("mlp_down", entry.ffn_output)):
                module = get_path(block, path) if path else None
                if module is not None:
                    sites.velora.setdefault(role, []).append((f"{block_name}.{path}", module))
    if architecture.final_norm:
        named = dict(model.named_modules())
        norm_name = next((n for n in named if n.endswith(architecture.final_norm)), None)
        head_name = next((n for n in named if n.endswith("lm_head")), None)
        if norm_name is not None and head_name is not None:
            sites.norms.append(NormSite(norm_name, named[norm_name], architecture.norm_kind,
                                        [(head_name, named[head_name])], is_final=True))
    sites.notes.extend(architecture.notes)


def layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The decoder (or encoder) layer list, or None when the model has none of the usual ones."""
    try:
        return find_layer_stack(model)
    except ValueError:
        pass
    for name, module in hf_model(model).named_modules():  # BERT: <base>.encoder.layer, ViT: vit.layers
        if name.endswith(("encoder.layer", ".layers")) and isinstance(module, nn.ModuleList):
            return module
    return None


def find_sites(model: nn.Module) -> Sites:
    """Every patchable site of ``model`` (see the module docstring)."""
    model_type = model_type_of(model)
    architecture = ARCHITECTURES.get(model_type)
    sites = Sites(model_type, architecture is not None and architecture.norm_kind is not None)
    lm = hf_model(model)
    if type(lm).__name__.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(lm, "lm_head"):
        sites.causal_lm = lm
    sites.layer_stack = layer_stack(model)
    if sites.known:
        _table_norms(model, sites)
    elif architecture is not None:  # placement-only family: VeLoRA roles still come from the table
        for entry in architecture.blocks:
            for block_name, block in blocks_of(model, entry):
                for role, path in (("attn_out", entry.attention_output), ("mlp_down", entry.ffn_output)):
                    module = get_path(block, path) if path else None
                    if module is not None:
                        sites.velora.setdefault(role, []).append((f"{block_name}.{path}", module))
    covered = {id(site.norm) for site in sites.norms}
    default_kind = architecture.norm_kind if sites.known else None
    for name, module in model.named_modules():
        if id(module) in covered:
            continue
        kind = generic_norm_kind(module)
        if kind is not None:
            if default_kind == "gemma" and kind == "rmsnorm":
                kind = "gemma"
            sites.norms.append(NormSite(name, module, kind))
            continue
        act = activation_kind(module)
        if act is not None:
            sites.activations.append(ActivationSite(name, module, *act))
            continue
        gate_up_down = [getattr(module, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        act_fn = getattr(module, "act_fn", None)
        if all(isinstance(m, nn.Module) for m in gate_up_down) and isinstance(act_fn, nn.Module) and \
                activation_kind(act_fn) is not None:
            sites.gated_mlps.append(GatedMLPSite(name, module, act_fn, triton_activation(activation_kind(act_fn))))
        elif is_adapter_linear(module):
            sites.adapter_linears.append((name, module))
    return sites


__all__ = ["ActivationSite", "GatedMLPSite", "NormSite", "Sites", "activation_kind", "find_sites", "hf_model",
           "is_adapter_linear", "triton_activation"]
