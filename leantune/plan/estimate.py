"""Closed-form byte counts of the parts the planner does not trace: weights (bitsandbytes bases included) and the
optimizer state of every optimizer leantune offers, in the layouts ``optimizer_state_bytes`` measures.

Per trainable tensor of n numbers in dtype size b, and per targeted m x n matrix (k = min(m, n), M = max(m, n),
r = min(rank, k)):

    AdamW (torch)            2·n·b + 4 (the fp32 step tensor)
    8-bit AdamW (bnb)        n ≥ 4096: 2·(n + 4⌈n/256⌉) + 2·1024 (two qmaps per tensor); else 2·n·4
    leantune, not targeted   2·n·b (8-bit optimizers: as 8-bit AdamW without the qmaps)
    GaLore / Fira / rSVD     2·r·M·b + r·k·b  (Fira + 1 norm)        8-bit GaLore: moments 8-bit when r·M ≥ 4096
    DCT                      2·r·M·b + 4·r, + one shared d x d basis per size d
    Natural GaLore           GaLore + s·r·M·b (history, s = 4)
    GaLore-Adafactor         fp32: r·M (first moment) + r + M (factored second moment) + r·k
    APOLLO(-Mini)            2·r·M·b + b (the projection is regenerated from a seed)
    Conda                    2·m·n·b + k²·b
    GradNormLoRP             GaLore + 4·out·4 (magnitude, ‖V‖ and the magnitude's two moments, fp32)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

QUANT_BYTES = {  # bytes per weight of a quantized base linear (bnb defaults), and per output row
    "4bit": (0.5 + 4 / 64, 0),  # nf4 codes + an fp32 absmax per 64-block (no double quantization)
    "8bit": (1.0, 4),  # int8 codes + an fp32 scale per output row (LLM.int8)
}


def weight_bytes(model: torch.nn.Module, quant: str | None) -> tuple[int, int]:
    """(all weight bytes, of which quantized base linears); the output head is never quantized (bnb's default)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantized = set()
    if quant:
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head and not module.weight.requires_grad:
                quantized.add(id(module.weight))
    total = qbytes = 0
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in quantized:
                per, per_row = QUANT_BYTES[quant]
                size = int(p.numel() * per + p.shape[0] * per_row)
                qbytes += size
            else:
                size = p.numel() * p.element_size()
            total += size
    return total, qbytes


def optimizer_state_bytes(name: str, params: Iterable[torch.Tensor], targets: set[int], rank: int | None = None,
                          history_size: int = 4) -> int:
    """Predicted optimizer state (see module docstring) for trainable ``params``; ``targets`` holds the ids of the
    projected matrices of low-rank optimizers."""
    params = list(params)
    if name in ("adamw", "torch_adamw"):
        return sum(2 * p.numel() * p.element_size() + 4 for p in params)
    if name in ("adamw8bit", "bnb_adamw8bit"):
        return sum(2 * (p.numel() + 4 * math.ceil(p.numel() / 256)) + 2 * 1024 if p.numel() >= 4096
                   else 2 * p.numel() * 4 for p in params)
    total = 0
    dct_sizes: dict[int, int] = {}
    for p in params:
        b = p.element_size()
        if id(p) not in targets or p.ndim != 2:
            n = p.numel()
            total += 2 * (n + 4 * math.ceil(n / 256)) if name.endswith("8bit") and n >= 4096 else 2 * n * b
            continue
        m, n = p.shape
        k, M = min(m, n), max(m, n)
        r = min(rank or 1, k)
        if name == "conda_adamw":
            total += 2 * m * n * b + k * k * b
        elif name in ("apollo_adamw", "apollo_mini"):
            r = 1 if name == "apollo_mini" else r
            total += 2 * r * M * b + b
        elif name == "galore_adafactor":
            total += 4 * (r * M + r + M + r * k)
        else:
            moments = 2 * r * M * b
            if name.endswith("8bit") and r * M >= 4096:
                moments = 2 * (r * M + 4 * math.ceil(r * M / 256))
            if name in ("dct_adamw", "dct_fira_adamw"):
                total += moments + 4 * r
                dct_sizes[k] = b
                continue
            total += moments + r * k * b
            if name in ("fira_adamw",):
                total += b
            if name == "natural_galore_adamw":
                total += history_size * r * M * b
            if name.startswith("gradnorm_lorp"):
                total += 4 * m * 4
    total += sum(d * d * b for d, b in dct_sizes.items())
    if name.endswith("8bit"):
        total += 2 * 256 * 4  # the two shared quantization maps
    return total
