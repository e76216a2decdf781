"""Closed-form byte counts of the parts the planner does not trace: weights (bitsandbytes bases included) and the
optimizer state of every optimizer leantune offers, in the layouts ``optimizer_state_bytes`` measures.

torch's AdamW: 2·n·b + 4 (the fp32 step tensor) per trainable tensor of n numbers in dtype size b;
bitsandbytes' 8-bit AdamW: n ≥ 4096: 2·(n + 4⌈n/256⌉) + 2·1024 (two qmaps per tensor), else 2·n·4. leantune's
optimizers: each one's :class:`~leantune.optim.spec.OptimizerSpec` (formulas in ``leantune/optim/spec.py``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from leantune.kernels.int8_linear import CHUNK_NUMEL, Int8Linear, is_int8_weight
from leantune.optim import OPTIMIZERS

QUANT_BYTES = {  # bytes per weight of a quantized base linear (bnb defaults), and per output row
    "4bit": (0.5 + 4 / 64, 0),  # nf4 codes + an fp32 absmax per 64-block (no double quantization)
    "8bit": (1.0, 4),  # int8 codes + an fp32 scale per output row (LLM.int8)
}


def weight_bytes(model: torch.nn.Module, quant: str | None) -> tuple[int, int, int]:
    """(all weight bytes, of which quantized base linears, of which their absmax / row scales); the output head is
    never quantized (bnb's default). The scales live beside the parameter (bitsandbytes' ``QuantState`` on the
    module, ``SCB``), so FSDP shards the codes but every rank keeps all the scales."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantized = set()
    if quant:
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head and not module.weight.requires_grad:
                quantized.add(id(module.weight))
    total = qbytes = scales_total = 0
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
                scales_total += size - (p.numel() // 2 if quant == "4bit" else p.numel())
            else:
                size = p.numel() * p.element_size()
            total += size
    for module in model.modules():  # INT8 weights trained by Q-GaLore: codes (counted above) + fp32 block scales
        if isinstance(module, Int8Linear):
            scales = module.weight_scale.numel() * 4
            total += scales
            qbytes += scales + module.weight.numel()
    return total, qbytes, scales_total


def grad_bytes(p: torch.Tensor, compute: int) -> int:
    """Bytes of ``p``'s gradient: its own dtype, or the compute dtype (``compute`` bytes) for an INT8 weight, whose
    float gradient ``qgrad`` is in the activations' dtype."""
    return p.numel() * (compute if is_int8_weight(p) else p.element_size())


def requantize_bytes(p: torch.Tensor, compute: int) -> int:
    """Temporaries of one Q-GaLore update of the INT8 weight ``p`` (n numbers): deq(W) in fp32 (4n), the fp32 copy of
    a 16-bit gradient (4n), and the quantizer's per-chunk temporaries (|w|, w / s, ⌊w / s⌋, the SR noise: 4 × 4
    bytes per number of a :data:`~leantune.kernels.int8_linear.CHUNK_NUMEL` chunk of whole rows)."""
    n = p.numel()
    rows = max(1, CHUNK_NUMEL // p.shape[1])
    chunk = min(p.shape[0], rows) * p.shape[1]
    return 4 * n + (4 * n if compute != 4 else 0) + 16 * chunk


def zeroth_order_step_bytes(params: Iterable[torch.Tensor], bits: int | None = 4,
                            weight_bits: int | None = None) -> int:
    """Temporaries of QuZO's update (:mod:`leantune.optim.quzo`), which regenerates one trained tensor's direction
    at a time: a b-bit direction of n numbers holds three float32 tensors and one of bools while it is rounded
    (13n bytes; unrounded, MeZO's: the float32 Gaussian and its cast to the parameter's dtype); weights on a grid
    add the update in grid units (4n, float64 parameters 8n). The largest trained tensor sets the peak."""
    def one(p: torch.Tensor) -> int:
        n, work = p.numel(), max(4, p.element_size())
        direction = 13 * n if bits is not None else 4 * n + (p.element_size() * n if p.dtype != torch.float32 else 0)
        return direction + (work * n if weight_bits is not None else 0)

    return max((one(p) for p in params), default=0)


def optimizer_state_bytes(name: str, params: Iterable[torch.Tensor], targets: set[int], rank: int | None = None,
                          projector: str | None = None, options: dict[str, Any] | None = None) -> int:
    """Predicted optimizer state for trainable ``params``; ``targets`` holds the ids of the projected matrices.
    ``adamw`` / ``adamw8bit`` are torch's and bitsandbytes' (module docstring); every other name is a leantune
    optimizer and its bytes are its :class:`~leantune.optim.spec.OptimizerSpec`'s formula."""
    params = list(params)
    if name in ("adamw", "torch_adamw"):
        return sum(2 * p.numel() * p.element_size() + 4 for p in params)
    if name in ("adamw8bit", "bnb_adamw8bit"):
        return sum(2 * (p.numel() + 4 * math.ceil(p.numel() / 256)) + 2 * 1024 if p.numel() >= 4096
                   else 2 * p.numel() * 4 for p in params)
    spec = OPTIMIZERS[name]
    total = sum(spec.state_bytes(tuple(p.shape), rank, p.dtype, projected=id(p) in targets, projector=projector,
                                 options=options) for p in params)
    projected = [p for p in params if id(p) in targets and p.ndim == 2]
    dtype = projected[0].dtype if projected else torch.float32
    return total + spec.shared_bytes([tuple(p.shape) for p in projected], dtype, projector)


def replicated_state_bytes(name: str, params: Iterable[torch.Tensor], targets: set[int], rank: int | None = None,
                           projector: str | None = None, options: dict[str, Any] | None = None) -> int:
    """Of :func:`optimizer_state_bytes`, what FSDP2 leaves whole on every rank: each projected matrix's
    :meth:`~leantune.optim.spec.OptimizerSpec.replicated_bytes` and the optimizer's shared tensors (quantization
    maps, DCT bases). torch's and bitsandbytes' AdamW keep nothing whole."""
    if name in ("adamw", "torch_adamw", "adamw8bit", "bnb_adamw8bit"):
        return 0
    spec = OPTIMIZERS[name]
    projected = [p for p in params if id(p) in targets and p.ndim == 2]
    dtype = projected[0].dtype if projected else torch.float32
    return sum(spec.replicated_bytes(tuple(p.shape), rank, p.dtype, projector, options) for p in projected) + \
        spec.shared_bytes([tuple(p.shape) for p in projected], dtype, projector)
