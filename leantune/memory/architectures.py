"""Where each supported architecture keeps its norms, the linears they feed, activations and gated MLPs.

Supported ``model_type`` families: llama, mistral, qwen2, gemma (pre-RMSNorm, gated MLP), gpt2 (pre-LN, Conv1D),
bert, roberta (post-LN: the norm output also feeds the residual), t5 / mt5 (pre-RMSNorm "T5LayerNorm"), vit.
Everything is found by module *paths* relative to each transformer layer, so peft wrappers (``base_model.model.``
prefixes, ``LoraLayer`` around the linears) do not matter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

RMS_FAMILIES = {"llama": "rmsnorm", "mistral": "rmsnorm", "qwen2": "rmsnorm", "gemma": "gemma"}
SUPPORTED_MODEL_TYPES = (*RMS_FAMILIES, "gpt2", "bert", "roberta", "t5", "mt5", "vit")


@dataclass
class NormSite:
    """A norm whose affine can be folded into ``consumers`` (the linears reading its output).

    ``post_norm``: the output is also used elsewhere (BERT's residual), so the patched norm still returns
    ``γ ⊙ ŷ + β`` and only the folded consumers receive ŷ.
    """

    name: str
    norm: nn.Module
    kind: str  # "layernorm", "rmsnorm", "t5", "gemma"
    consumers: list[tuple[str, nn.Module]]
    post_norm: bool = False
    is_final: bool = False


@dataclass
class ActivationSite:
    name: str
    parent: nn.Module
    attr: str


@dataclass
class GatedMLPSite:
    name: str
    mlp: nn.Module
    gate: str
    up: str
    down: str
    act: str


@dataclass
class Layout:
    model_type: str
    norms: list[NormSite] = field(default_factory=list)
    activations: list[ActivationSite] = field(default_factory=list)
    gated_mlps: list[GatedMLPSite] = field(default_factory=list)
    velora: dict[str, list[tuple[str, nn.Module]]] = field(default_factory=dict)  # role -> linears
    notes: list[str] = field(default_factory=list)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside a (possibly peft-wrapped) model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(hf_model(model), "config", None)
    return getattr(config, "model_type", None)


def activation_kind(module) -> tuple[str, str | None] | None:
    """("gelu"|"silu", approximate) for GELU/SiLU modules; approximate None = keep the module's own forward."""
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


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _layers(root: nn.Module, class_suffix: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in root.named_modules() if type(m).__name__.endswith(class_suffix)]


def _site(layout: Layout, root_name: str, layer: nn.Module, norm_path: str, consumer_paths: list[str], kind: str,
          post_norm: bool = False) -> None:
    norm = _get(layer, norm_path)
    consumers = [(f"{root_name}.{p}", _get(layer, p)) for p in consumer_paths]
    if norm is None or any(c is None for _, c in consumers):
        layout.notes.append(f"{root_name}.{norm_path}: expected modules not found; norm left unchanged")
        return
    layout.norms.append(NormSite(f"{root_name}.{norm_path}", norm, kind, consumers, post_norm))


def _act(layout: Layout, root_name: str, layer: nn.Module, path: str) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = _get(layer, parent_path) if parent_path else layer
    if parent is not None and isinstance(getattr(parent, attr, None), nn.Module):
        layout.activations.append(ActivationSite(f"{root_name}.{path}", parent, attr))


def _role(layout: Layout, role: str, root_name: str, layer: nn.Module, path: str) -> None:
    module = _get(layer, path)
    if module is not None:
        layout.velora.setdefault(role, []).append((f"{root_name}.{path}", module))


def _final_norm(layout: Layout, model: nn.Module, norm_suffix: str, kind: str) -> None:
    """Final norm -> lm_head (causal LMs only)."""
    named = dict(model.named_modules())
    norm_name = next((n for n in named if n.endswith(norm_suffix)), None)
    head_name = next((n for n in named if n.endswith("lm_head")), None)
    if norm_name is None or head_name is None:
        return
    site = NormSite(norm_name, named[norm_name], kind, [(head_name, named[head_name])], is_final=True)
    layout.norms.append(site)


def describe(model: nn.Module) -> Layout | None:
    """The :class:`Layout` of a supported model, ``None`` for an unknown architecture."""
    model_type = model_type_of(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return None
    layout = Layout(model_type)
    if model_type in RMS_FAMILIES:
        kind = RMS_FAMILIES[model_type]
        for name, layer in _layers(model, "DecoderLayer"):
            _site(layout, name, layer, "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj",
                                                           "self_attn.v_proj"], kind)
            _site(layout, name, layer, "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], kind)
            layout.gated_mlps.append(GatedMLPSite(f"{name}.mlp", layer.mlp, "gate_proj", "up_proj", "down_proj",
                                                  "act_fn"))
            _act(layout, name, layer, "mlp.act_fn")
            _role(layout, "attn_out", name, layer, "self_attn.o_proj")
            _role(layout, "mlp_down", name, layer, "mlp.down_proj")
        _final_norm(layout, model, "model.norm" if any(n.endswith("model.norm") for n, _ in model.named_modules())
                    else "norm", kind)
    elif model_type == "gpt2":
        for name, layer in _layers(model, "GPT2Block"):
            _site(layout, name, layer, "ln_1", ["attn.c_attn"], "layernorm")
            _site(layout, name, layer, "ln_2", ["mlp.c_fc"], "layernorm")
            _act(layout, name, layer, "mlp.act")
            _role(layout, "attn_out", name, layer, "attn.c_proj")
            _role(layout, "mlp_down", name, layer, "mlp.c_proj")
        _final_norm(layout, model, "ln_f", "layernorm")
    elif model_type in ("bert", "roberta"):
        layers = _layers(model, "Layer")
        layers = [(n, m) for n, m in layers if hasattr(m, "attention") and hasattr(m, "intermediate")]
        for i, (name, layer) in enumerate(layers):
            _site(layout, name, layer, "attention.output.LayerNorm", ["intermediate.dense"], "layernorm",
                  post_norm=True)
            if i + 1 < len(layers):
                next_name, next_layer = layers[i + 1]
                norm = layer.output.LayerNorm
                consumers = [(f"{next_name}.attention.self.{p}", getattr(next_layer.attention.self, p))
                             for p in ("query", "key", "value")]
                layout.norms.append(NormSite(f"{name}.output.LayerNorm", norm, "layernorm", consumers, True))
            _act(layout, name, layer, "intermediate.intermediate_act_fn")
            _role(layout, "attn_out", name, layer, "attention.output.dense")
            _role(layout, "mlp_down", name, layer, "output.dense")
        layout.notes.append("embeddings.LayerNorm and the last layer's output LayerNorm keep their affine "
                            "(dropout / pooler follow them)")
    elif model_type in ("t5", "mt5"):
        for name, block in _layers(model, "T5Block"):
            for j, sub in enumerate(block.layer):
                sub_name = f"{name}.layer.{j}"
                cls = type(sub).__name__
                if cls == "T5LayerSelfAttention":
                    _site(layout, sub_name, sub, "layer_norm", ["SelfAttention.q", "SelfAttention.k",
                                                                "SelfAttention.v"], "t5")
                    _role(layout, "attn_out", sub_name, sub, "SelfAttention.o")
                elif cls == "T5LayerCrossAttention":
                    _site(layout, sub_name, sub, "layer_norm", ["EncDecAttention.q"], "t5")
                elif cls == "T5LayerFF":
                    ff = sub.DenseReluDense
                    inputs = ["DenseReluDense.wi"] if hasattr(ff, "wi") else ["DenseReluDense.wi_0",
                                                                               "DenseReluDense.wi_1"]
                    _site(layout, sub_name, sub, "layer_norm", inputs, "t5")
                    _act(layout, sub_name, sub, "DenseReluDense.act")
                    _role(layout, "mlp_down", sub_name, sub, "DenseReluDense.wo")
        layout.notes.append("T5 final layer norms are not folded (cross-attention / tied lm_head follow them)")
    elif model_type == "vit":
        for name, layer in _layers(model, "ViTLayer"):
            _site(layout, name, layer, "layernorm_before", ["attention.q_proj", "attention.k_proj",
                                                            "attention.v_proj"], "layernorm")
            _site(layout, name, layer, "layernorm_after", ["mlp.fc1"], "layernorm")
            _act(layout, name, layer, "mlp.activation_fn")
            _role(layout, "attn_out", name, layer, "attention.o_proj")
            _role(layout, "mlp_down", name, layer, "mlp.fc2")
        layout.notes.append("the final ViT layernorm keeps its affine (pooler / classifier follow it)")
    return layout
