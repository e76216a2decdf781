"""ComPEFT: compress a fine-tuning update by sparsification and ternary quantization (Yadav et al., arXiv 2311.13171).

For a task vector τ = θ_ft − θ_init (flattened), density p and scale α:

    keep  = the ⌊p·d⌋ entries of largest |τ|            (exactly that many; ties broken by position, first kept)
    σ     = std(τ)                                       (of the whole, un-pruned τ; unbiased, as torch.std)
    τ̃_i   = α·σ·sign(τ_i)  if i ∈ keep,  else 0          (ternary: one scale for the unit)
    θ     = θ_init + τ̃                                   (no retraining)

What τ is here (``compress_adapter``): the adapter's own trained tensors with θ_init = 0, as the paper does for LoRA
(raw A and B entries, not BA); θ_init = 1 for (IA)³ vectors. Tensors that are not a trainable update are copied
exactly and reported: frozen adapter tensors (LoRA-XS / LoRA-SB's SVD factors, NOLA's seeds), ``modules_to_save``
heads (new layers have no pretrained θ_init), DoRA magnitudes (their θ_init is a norm of the base weight) and
integer tensors. ``compress_full`` compresses a full fine-tuning delta (tuned − base) per tensor.

``scope``: "tensor" (default) gives each tensor its own top-k, σ and scale; "global" is the paper's one vector over
the whole adapter. Per tensor is the default because LoRA's A (Kaiming-initialised, θ_init = 0 makes τ the whole A)
and B (zero-initialised, small) differ by orders of magnitude: a global top-k then keeps almost only A and zeroes B,
and with it the update (measured in ``benchmarks/compress.py``).

``alpha``: a number, or "auto" = mean |τ| over the kept entries / σ, i.e. each kept entry gets the mean magnitude of
the kept entries (the L1 mass of the top-k vector is preserved; the rule of Sattler et al.'s STC). The paper picks
α on validation data; ``benchmarks/compress.py`` shows both.

Storage (``encoding``): kept positions as Golomb–Rice codes of the gaps with parameter b* = 1 + ⌊log₂(ln(φ−1) /
ln(1−p))⌋ (φ the golden ratio, STC's choice) plus one sign bit per kept entry and one fp32 scale: ≈ p·d·(b* + 2 +
…) bits (47× smaller than fp16 at p = 0.05, 28× at 0.1, 17× at 0.2); or ``"bitmask"``: a d-bit presence mask + a
sign bit per kept entry. Both decode to exactly the ternary τ̃ (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

ENCODINGS = ("golomb", "bitmask")
SCOPES = ("tensor", "global")
GOLDEN = (1 + math.sqrt(5)) / 2


@dataclass
class Ternary:
    """A compressed unit: d entries, the kept positions (sorted), their signs (+1 / −1) and the one scale α·σ."""

    numel: int
    positions: torch.Tensor  # int64, sorted
    signs: torch.Tensor  # bool, True = positive
    scale: float
    sigma: float
    alpha: float

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """τ̃ as a flat dense tensor."""
        out = torch.zeros(self.numel, dtype=dtype)
        values = torch.where(self.signs, self.scale, -self.scale).to(dtype)
        out[self.positions] = values
        return out


def ternarize(tau: torch.Tensor, density: float, alpha: float | str = "auto") -> Ternary:
    """ComPEFT's sparsify + ternarize of a flat task vector (module docstring)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = tau.detach().reshape(-1).to(torch.float64)
    d = flat.numel()
    k = int(math.floor(density * d))
    if d < 2 or k < 1:
        raise ValueError(f"density {density} keeps no entry of a {d}-element tensor; raise the density, or compress "
                         "with scope='global' (one top-k over the whole adapter, as the paper does)")
    sigma = float(flat.std())
    order = torch.argsort(flat.abs(), descending=True, stable=True)  # ties: the earlier position first
    keep = torch.sort(order[:k]).values
    kept = flat[keep]
    if alpha == "auto":
        alpha_value = float(kept.abs().mean() / sigma) if sigma > 0 else 0.0
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0:
        alpha_value = float(alpha)
    else:
        raise ValueError(f"alpha must be a positive number or 'auto', got {alpha!r}")
    scale = float(np.float32(alpha_value * sigma))  # stored as fp32: the dense form uses the same value
    return Ternary(d, keep, kept > 0, scale, sigma, alpha_value)


# ---- encodings -----------------------------------------------------------------------------------------------------

def golomb_parameter(density: float) -> int:
    """b* = 1 + ⌊log₂(ln(φ − 1) / ln(1 − p))⌋, at least 0 (the Rice parameter for geometric gaps of rate p)."""
    if density >= 1.0:
        return 0
    return max(0, 1 + math.floor(math.log2(math.log(GOLDEN - 1) / math.log(1 - density))))


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8), bitorder="little")


def _unpack(data: np.ndarray, count: int) -> np.ndarray:
    return np.unpackbits(data, count=count, bitorder="little").astype(bool)


def golomb_encode(positions: np.ndarray, b: int) -> tuple[np.ndarray, int]:
    """Rice codes of the gaps between sorted positions (first gap = first position): q ones, a zero, b bits of r.
    Returns the packed bytes and the number of bits."""
    gaps = np.diff(positions, prepend=0).astype(np.int64)
    gaps[1:] -= 1  # positions are distinct: gaps after the first are >= 1
    q, r = gaps >> b, gaps & ((1 << b) - 1)
    lengths = q + 1 + b
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    bits = np.zeros(total, dtype=bool)
    ones = np.repeat(starts, q) + (np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q))
    bits[ones] = True
    for j in range(b):  # remainder, most significant bit first
        bits[starts + q + 1 + j] = (r >> (b - 1 - j)) & 1
    return _pack(bits), total


def golomb_decode(data: np.ndarray, nbits: int, count: int, b: int) -> np.ndarray:
    """Inverse of :func:`golomb_encode`."""
    bits = _unpack(data, nbits)
    zeros = np.flatnonzero(~bits)  # each code's unary part ends at the first zero at or after its start
    weights = 1 << np.arange(b - 1, -1, -1)
    out = np.empty(count, dtype=np.int64)
    pos, previous = 0, -1
    for i in range(count):
        end = int(zeros[np.searchsorted(zeros, pos)])
        gap = ((end - pos) << b) + (int(bits[end + 1:end + 1 + b].astype(np.int64) @ weights) if b else 0)
        previous = previous + 1 + gap
        out[i] = previous
        pos = end + 1 + b
    return out


def encode(unit: Ternary, encoding: str, density: float) -> dict[str, np.ndarray | int]:
    """The stored form of ``unit``: positions (Golomb or bitmask) + packed signs."""
    positions = unit.positions.numpy()
    signs = _pack(unit.signs.numpy())
    if encoding == "golomb":
        b = golomb_parameter(density)
        data, nbits = golomb_encode(positions, b)
        return {"positions": data, "signs": signs, "nbits": nbits, "b": b}
    if encoding == "bitmask":
        mask = np.zeros(unit.numel, dtype=bool)
        mask[positions] = True
        return {"positions": _pack(mask), "signs": signs, "nbits": unit.numel, "b": -1}
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def decode(stored: dict, numel: int, count: int, scale: float) -> Ternary:
    """Inverse of :func:`encode`."""
    if int(stored["b"]) < 0:
        positions = np.flatnonzero(_unpack(stored["positions"], numel))
    else:
        positions = golomb_decode(stored["positions"], int(stored["nbits"]), count, int(stored["b"]))
    signs = _unpack(stored["signs"], count)
    return Ternary(numel, torch.from_numpy(positions.copy()), torch.from_numpy(signs.copy()), scale, float("nan"),
                   float("nan"))


def stored_bits(stored: dict) -> int:
    """Bits of the stored form (positions + signs + a 32-bit scale), the figure behind the compression ratio."""
    return int(stored["nbits"]) + int(stored["signs"].size * 8) + 32


def concat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
