"""DIVISION's dual-precision saved activations (Wang et al., arXiv 2208.04187) — the budget's one lossy mode.

Backpropagation mostly uses an activation's low-frequency component; most of its bytes are the high-frequency
rest. Every floating tensor a layer saves for backward (≥ ``MIN_ROWS`` rows, ≥ ``MIN_WIDTH`` wide: norm statistics stay
exact) is stored as

    LFC = mean of each block of ``block`` consecutive rows        (rows: all dimensions but the last, i.e. tokens;
                                                                   kept in bf16 — the paper's block 8, fp16)
    HFC = x − LFC repeated over its block                         (quantized to ``bits`` bits per element, with a
                                                                   bf16 minimum and scale per group of ``group``)

and rebuilt as ``LFC (repeated) + dequantized HFC`` when backward unpacks it — ≈ 2 + 16/8 + 32/64 = 4.5 bits per
element instead of 32 (fp32) or 16 (bf16). The paper pools 2-D feature maps; leantune pools consecutive tokens
(its choice for sequences). Lossy: the gradients change; ``tests/memory/test_budget.py`` measures how much.
Off unless named (``MemoryConfig(layer_modes="division")`` or ``budget_modes=(..., "division")``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

BLOCK, BITS, GROUP, MIN_ROWS, MIN_WIDTH = 8, 2, 64, 16, 16  # narrow tensors (norm statistics) stay exact


class _Packed:
    """A compressed saved tensor: its shape and dtype, the LFC, the 2-bit HFC codes and their group ranges."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, lfc: torch.Tensor, codes: torch.Tensor,
                 low: torch.Tensor, scale: torch.Tensor, numel: int) -> None:
        self.shape, self.dtype, self.lfc, self.codes, self.low, self.scale, self.numel = \
            shape, dtype, lfc, codes, low, scale, numel


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    rows = x.reshape(-1, x.shape[-1])
    pad = (-rows.shape[0]) % BLOCK
    if pad:
        rows = torch.cat([rows, rows[-1:].expand(pad, -1)])
    return rows, pad


def pack(x: torch.Tensor) -> Any:
    """Saved-tensor pack hook: compress floating tensors with enough rows, keep the rest as they are."""
    if not x.is_floating_point() or x.dim() < 2 or x.shape[-1] < MIN_WIDTH or \
            x.numel() // x.shape[-1] < MIN_ROWS or isinstance(x, torch.nn.Parameter):
        return x
    with torch.no_grad():
        rows, _ = _blocks(x.float())
        n, width = rows.shape
        lfc = rows.view(n // BLOCK, BLOCK, width).mean(dim=1)
        hfc = (rows.view(n // BLOCK, BLOCK, width) - lfc[:, None]).reshape(-1)
        pad = (-hfc.numel()) % GROUP
        groups = F.pad(hfc, (0, pad)).view(-1, GROUP)
        low = groups.amin(dim=1, keepdim=True)
        scale = ((groups.amax(dim=1, keepdim=True) - low) / (2**BITS - 1)).clamp_min(1e-12)
        codes = torch.round((groups - low) / scale).clamp_(0, 2**BITS - 1).to(torch.uint8).view(-1, 4)
        packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)  # four codes a byte
    return _Packed(x.shape, x.dtype, lfc.to(torch.bfloat16), packed, low.to(torch.bfloat16),
                   scale.to(torch.bfloat16), hfc.numel())


def unpack(p: Any) -> torch.Tensor:
    """Saved-tensor unpack hook: LFC repeated over its block + the dequantized HFC, in the original dtype."""
    if not isinstance(p, _Packed):
        return p
    codes = torch.stack([(p.codes >> s) & 3 for s in (0, 2, 4, 6)], dim=1).view(-1, GROUP).float()
    hfc = (codes * p.scale.float() + p.low.float()).reshape(-1)[: p.numel]
    width = p.shape[-1]
    rows = hfc.view(-1, BLOCK, width) + p.lfc.float()[:, None]
    count = torch.Size(p.shape).numel() // width
    return rows.reshape(-1, width)[:count].reshape(p.shape).to(p.dtype)

