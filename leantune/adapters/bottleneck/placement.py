"""Where bottleneck adapters go in each Hugging Face architecture family.

An adapter is applied to the output of the Linear (or GPT-2 Conv1D) that produces a sublayer's output,
*before* that sublayer's dropout, residual addition and LayerNorm: exactly where Houlsby et al. put it
("applied directly to the output of the sub-layer, after it has been projected back to the input size,
but before adding the skip connection back") and where the official Compacter code applies it in T5
(``hidden + dropout(adapter(sublayer_out))``). Cross-attention gets no adapter (as in that code).

The sublayer outputs of each family come from leantune's one architecture table
(:data:`leantune.architectures.ARCHITECTURES`: ``attention_output`` and ``ffn_output``); ``houlsby`` uses both,
``pfeiffer`` (and Compacter++) only the second.
"""

from __future__ import annotations

from leantune.architectures import ARCHITECTURES, sublayer_output_regex

#: ``model_type`` values the placement knows (those of the architecture table with both sublayer outputs).
PLACEMENTS = tuple(sorted(name for name in ARCHITECTURES if sublayer_output_regex(name, "ffn_output")))


def placement_regex(model_type: str | None, placement: str) -> str:
    """The ``target_modules`` regex for ``placement`` ("houlsby" | "pfeiffer") in a ``model_type`` model."""
    if model_type not in PLACEMENTS:
        raise ValueError(
            f"Bottleneck adapters do not know where the sublayer outputs of model_type={model_type!r} are "
            f"(known: {list(PLACEMENTS)}). Pass target_modules naming the Linear layers that produce each "
            "block's attention output and feed-forward output, e.g. "
            "BottleneckConfig(target_modules=['attn.out_proj', 'mlp.fc2']) (suffix match) or a regex "
            r"such as target_modules=r'.*\.layers\.\d+\.(attn\.out_proj|mlp\.fc2)'."
        )
    ffn = sublayer_output_regex(model_type, "ffn_output")
    if placement == "houlsby":
        return f"({sublayer_output_regex(model_type, 'attention_output')})|({ffn})"
    return ffn
