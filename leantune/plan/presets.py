"""Model configs the planner knows by name (architecture numbers from the models' published ``config.json``)."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig

_LLAMA2 = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-5, tie_word_embeddings=False,
               max_position_embeddings=4096)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, tie_word_embeddings=False,
               max_position_embeddings=8192, rope_theta=500000.0)

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}


def config_from(source: str | dict[str, Any]):
    """A transformers config from a preset name, a model folder / ``config.json`` path, or a dict."""
    if isinstance(source, dict):
        values = dict(source)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if source in PRESETS:
        values = dict(PRESETS[source])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if os.path.isdir(source) or source.endswith(".json"):
        path = os.path.dirname(source) if source.endswith(".json") else source
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as err:  # TypeError: a JSON list (transformers < 5.25)
            raise ValueError(f"{source}: not a readable transformers config ({str(err).splitlines()[0]})") from None
    raise ValueError(f"unknown model {source!r}: give a model folder, a config.json, or one of {sorted(PRESETS)}")
