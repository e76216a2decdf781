"""Where each supported Hugging Face architecture keeps what leantune touches: one table, read by every part.

Per ``model_type``, an :class:`Architecture` lists its transformer blocks (found by class-name suffix) and, inside a
block, by module path:

* ``attention_output`` / ``ffn_output`` — the Linear (GPT-2: Conv1D) producing the self-attention and feed-forward
  sublayer outputs. Bottleneck adapters go after them (Houlsby: both, Pfeiffer: the second), VeLoRA compresses the
  inputs of their LoRA-A (roles ``attn_out`` / ``mlp_down``);
* ``norms`` — which norm feeds which linears, so ``leantune.memory`` can fold the norm's affine into them
  (``post_norm``: the output also feeds the residual, BERT; ``next_block``: the consumers sit in the next block);
* ``norm_kind`` and ``final_norm`` — the norm flavour (``"gemma"`` scales by 1 + w) and the final norm feeding
  ``lm_head`` in causal LMs.

Activation modules, gated MLPs (``gate_proj``/``up_proj``/``down_proj``/``act_fn``) and adapter linears are found by
their type in any model (:mod:`leantune.patching.sites`), so they need no entry. A new architecture is one entry
here; an architecture without ``norms`` gets no norm folding (and ``leantune.memory`` says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from leantune._utils import PEFT_PREFIX


@dataclass(frozen=True)
class NormEntry:
    """A norm (``path``) and the linears reading its output; ``consumers`` lists alternatives, the first whose
    modules all exist wins (T5's feed-forward is ``wi`` or ``wi_0`` + ``wi_1``)."""

    path: str
    consumers: tuple[tuple[str, ...], ...]
    post_norm: bool = False
    next_block: bool = False


@dataclass(frozen=True)
class BlockEntry:
    """A transformer block: modules whose class name ends with ``suffix`` and that have every attribute in
    ``requires``; paths are relative to the block."""

    suffix: str
    attention_output: str | None = None
    ffn_output: str | None = None
    norms: tuple[NormEntry, ...] = ()
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    blocks: tuple[BlockEntry, ...]
    norm_kind: str | None = None  # "layernorm" | "rmsnorm" | "gemma"; None: no norm folding for this family
    final_norm: str | None = None  # path suffix of the final norm feeding lm_head (causal LMs)
    notes: tuple[str, ...] = ()


def _norm(path: str, *consumers: str, post_norm: bool = False, next_block: bool = False) -> NormEntry:
    return NormEntry(path, (tuple(consumers),), post_norm, next_block)


def _llama(kind: str | None) -> Architecture:
    norms = () if kind is None else (
        _norm("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        _norm("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"),
    )
    return Architecture((BlockEntry("DecoderLayer", "self_attn.o_proj", "mlp.down_proj", norms),), kind,
                        "model.norm" if kind else None)


_BERT = Architecture(
    (BlockEntry("Layer", "attention.output.dense", "output.dense", (
        _norm("attention.output.LayerNorm", "intermediate.dense", post_norm=True),
        _norm("output.LayerNorm", "attention.self.query", "attention.self.key", "attention.self.value",
              post_norm=True, next_block=True),
    ), requires=("attention", "intermediate")),),
    "layernorm",
    notes=("embeddings.LayerNorm and the last layer's output LayerNorm keep their affine (dropout / pooler follow "
           "them)",),
)
_T5 = Architecture(
    (
        BlockEntry("T5LayerSelfAttention", attention_output="SelfAttention.o", norms=(
            _norm("layer_norm", "SelfAttention.q", "SelfAttention.k", "SelfAttention.v"),)),
        BlockEntry("T5LayerCrossAttention", norms=(_norm("layer_norm", "EncDecAttention.q"),)),
        BlockEntry("T5LayerFF", ffn_output="DenseReluDense.wo", norms=(NormEntry("layer_norm", (
            ("DenseReluDense.wi",), ("DenseReluDense.wi_0", "DenseReluDense.wi_1"))),)),
    ),
    "rmsnorm",
    notes=("T5 final layer norms are not folded (cross-attention / tied lm_head follow them)",),
)
_GPT2 = Architecture(
    (BlockEntry("GPT2Block", "attn.c_proj", "mlp.c_proj", (_norm("ln_1", "attn.c_attn"), _norm("ln_2", "mlp.c_fc"))),),
    "layernorm", "ln_f",
)
_VIT = Architecture(
    (BlockEntry("ViTLayer", "attention.o_proj", "mlp.fc2", (
        _norm("layernorm_before", "attention.q_proj", "attention.k_proj", "attention.v_proj"),
        _norm("layernorm_after", "mlp.fc1")), requires=("mlp",)),
     # the same block as transformers < 5.9 lays it out (attention.attention.query …, intermediate / output)
     BlockEntry("ViTLayer", "attention.output.dense", "output.dense", (
         _norm("layernorm_before", "attention.attention.query", "attention.attention.key", "attention.attention.value"),
         _norm("layernorm_after", "intermediate.dense")), requires=("intermediate",))),
    "layernorm",
    notes=("the final ViT layernorm keeps its affine (pooler / classifier follow it)",),
)
_DISTILBERT = Architecture((BlockEntry("TransformerBlock", "attention.out_lin", "ffn.lin2"),))

#: ``model_type`` (from the model's config) → its :class:`Architecture`.
ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(("llama", "mistral", "qwen2"), _llama("rmsnorm")),
    "gemma": _llama("gemma"),
    **dict.fromkeys(("qwen3", "gemma2"), _llama(None)),  # other norm layout (qk-norms, sandwich norms): not folded
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT),
    "distilbert": _DISTILBERT,
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5),
    "gpt2": _GPT2,
    "vit": _VIT,
}

#: families whose norms ``leantune.memory`` folds (the others only get placement / VeLoRA / kernels)
FOLDING_MODEL_TYPES = tuple(name for name, arch in ARCHITECTURES.items() if arch.norm_kind is not None)

#: causal LMs whose ``…ForCausalLM.forward`` is "base model → last hidden state → ``lm_head`` → ``loss_function``"
#: with nothing between (no logit soft-capping, scaling or auxiliary router loss), so the chunked LM-head loss
#: (``patching/loss_patch.py``) can take the hidden states from the base model instead (checked per model type
#: against transformers 5.25's code; others are refused with this list)
PLAIN_LM_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gpt2")


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside a (possibly peft-wrapped) model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(hf_model(model), "config", None), "model_type", None)


def get_path(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted ``path`` of ``module``, or None."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def blocks_of(model: nn.Module, entry: BlockEntry) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every block of kind ``entry`` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith(entry.suffix) and all(hasattr(m, a) for a in entry.requires)]


def sublayer_output_regex(model_type: str | None, which: str) -> str | None:
    """Full-match regex of the ``which`` ("attention_output" / "ffn_output") linears of ``model_type``, or None.

    Blocks live in ModuleLists, so their names end in an index: anchoring the path right after one keeps BERT's
    ``output.dense`` from also matching ``attention.output.dense``.
    """
    architecture = ARCHITECTURES.get(model_type)
    if architecture is None:
        return None
    paths = [getattr(b, which) for b in architecture.blocks if getattr(b, which)]
    return "|".join(rf"(.*\.)?\d+\.{re.escape(p)}" for p in paths) or None


def find_layer_stack(model: nn.Module, layers_attribute: str | None = None) -> nn.ModuleList:
    """The decoder-layer ModuleList: ``layers_attribute`` (dotted path) or the first of the usual paths (LISA samples
    from it, ``shard_model`` wraps each of its layers)."""
    candidates = [layers_attribute] if layers_attribute else [
        "model.layers", "model.model.layers", "transformer.h", f"{PEFT_PREFIX}model.layers", "layers", "model.decoder.layers",
    ]
    for path in candidates:
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"could not find the decoder layer list of {type(model).__name__} (tried {candidates}); "
        "pass layers_attribute='path.to.layers'."
    )
