"""Where bottleneck adapters go in each Hugging Face architecture family.

An adapter is applied to the output of the Linear (or GPT-2 Conv1D) that produces a sublayer's output,
*before* that sublayer's dropout, residual addition and LayerNorm: exactly where Houlsby et al. put it
("applied directly to the output of the sub-layer, after it has been projected back to the input size,
but before adding the skip connection back") and where the official Compacter code applies it in T5
(``hidden + dropout(adapter(sublayer_out))``). Cross-attention gets no adapter (as in that code).

Each family maps to two regexes (full match on module names): the attention-output projection and the
feed-forward output projection. ``houlsby`` uses both, ``pfeiffer`` (and Compacter++) only the second.
"""

from __future__ import annotations

from typing import NamedTuple


class Placement(NamedTuple):
    attention_output: str  # regex of the Linear producing the self-attention sublayer's output
    ffn_output: str  # regex of the Linear producing the feed-forward sublayer's output


_BERT = Placement(r"(.*\.)?attention\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense")
_T5 = Placement(r"(.*\.)?SelfAttention\.o", r"(.*\.)?DenseReluDense\.wo")
_GPT2 = Placement(r"(.*\.)?attn\.c_proj", r"(.*\.)?mlp\.c_proj")
_LLAMA = Placement(r"(.*\.)?self_attn\.o_proj", r"(.*\.)?mlp\.down_proj")
_DISTILBERT = Placement(r"(.*\.)?attention\.out_lin", r"(.*\.)?ffn\.lin2")

#: ``model_type`` (from the model's config) → placement of the two sublayer outputs.
PLACEMENTS: dict[str, Placement] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT),
    "distilbert": _DISTILBERT,
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5),
    "gpt2": _GPT2,
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _LLAMA),
}


def placement_regex(model_type: str | None, placement: str) -> str:
    """The ``target_modules`` regex for ``placement`` ("houlsby" | "pfeiffer") in a ``model_type`` model."""
    if model_type not in PLACEMENTS:
        raise ValueError(
            f"Bottleneck adapters do not know where the sublayer outputs of model_type={model_type!r} are "
            f"(known: {sorted(PLACEMENTS)}). Pass target_modules naming the Linear layers that produce each "
            "block's attention output and feed-forward output, e.g. "
            "BottleneckConfig(target_modules=['attn.out_proj', 'mlp.fc2']) (suffix match) or a regex "
            r"such as target_modules=r'.*\.layers\.\d+\.(attn\.out_proj|mlp\.fc2)'."
        )
    table = PLACEMENTS[model_type]
    if placement == "houlsby":
        return f"({table.attention_output})|({table.ffn_output})"
    return table.ffn_output
