"""Trainable-parameter accounting that separates adapter weights from unfrozen LayerNorms and heads.

The Compacter paper's parameter fractions (0.047% for Compacter++ on T5-base) only come out when the
trainable LayerNorm parameters are counted too, so this reports them separately. Works for any peft model.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .model import is_norm_layer


def _adapter_roots(model: nn.Module) -> list[tuple[str, str]]:
    """``(root, base)`` name prefixes: parameters under ``root`` but not under ``base`` belong to an adapter."""
    pairs = []
    for name, module in model.named_modules():
        dot = f"{name}." if name else ""
        if isinstance(module, BaseTunerLayer):
            pairs.append((dot, f"{dot}base_layer."))
        elif isinstance(module, BaseTuner):  # tuner-level shared state (e.g. Compacter's rule), not its model
            pairs.append((dot, f"{dot}model."))
    return pairs


def count_trainable(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of a (peft) model, each tensor counted once, as a dict with keys

    ``adapter`` (inside tuner layers, plus tuner-level shared tensors such as Compacter's rule),
    ``layer_norm`` (LayerNorm/RMSNorm parameters, including peft's trainable copies of them),
    ``other`` (everything else, e.g. a classifier head in ``modules_to_save``) and ``total``.
    """
    roots = _adapter_roots(model)
    norm_params = {id(p) for m in model.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)}
    counts = {"adapter": 0, "layer_norm": 0, "other": 0}
    for name, param in model.named_parameters():  # deduplicates shared tensors
        if not param.requires_grad:
            continue
        if id(param) in norm_params:
            kind = "layer_norm"
        elif any(name.startswith(root) and not name.startswith(base) for root, base in roots):
            kind = "adapter"
        else:
            kind = "other"
        counts[kind] += param.numel()
    counts["total"] = sum(counts.values())
    return counts
