"""Blockwise integer quantization with nearest or stochastic rounding (Q-GaLore, Zhang et al. 2024, arXiv 2407.08296,
§3.2–3.3: INT8 weights updated with stochastic rounding, INT4 projection matrices).

A tensor is cut into blocks of ``block`` consecutive numbers. For INT8 weights (``per_row=True``) the blocks run
along each row of the m × n matrix and a row never shares a block with the next (the last block of a row may be
shorter, so any n works and the linear can dequantize a row block with one scale); otherwise the blocks run over the
flattened tensor (its tail padded with zeros). Per block b with absmax a_b (the symmetric "absmax" scheme):

    s_b = a_b / q_max,                 q_max = 2^(bits−1) − 1   (127 for INT8, 7 for INT4)
    q   = clamp(ρ(w / s_b), −q_max, q_max),      deq(q) = q · s_b

with ρ = round-to-nearest (ties to even) or stochastic rounding

    SR(x) = ⌊x⌋ + 1[u < x − ⌊x⌋],  u ~ U[0, 1)   ⇒   E[SR(x)] = x,   Var[SR(x)] = f (1 − f),  f = x − ⌊x⌋.

The scale depends only on the block being quantized, so E[deq(SR(w / s))] = w exactly (unbiased), including the
block's extremes (|w / s| ≤ q_max, the clamp never bites). Q-GaLore's code uses an asymmetric min/max scheme with an
integer zero point, which clips a block that does not straddle 0 (error 0.5 step on a [0.5, 1] block); the scheme
``"minmax"`` reproduces it for parity checks only.

The uniform noise u comes from a generator seeded with the caller's seed (``stochastic_seed``: one number per
parameter and step), so every DDP rank draws the same noise without communicating and a resumed run draws what the
uninterrupted one would have. CPU and CUDA generators give different streams for the same seed.

INT4 codes are packed two per byte (low nibble first): a projector of k numbers takes ⌈k/block⌉·block / 2 bytes plus
one fp32 scale per block.
"""

from __future__ import annotations

import math

import torch

SCHEMES = ("absmax", "minmax")


def qmax(bits: int) -> int:
    """Largest code of the symmetric scheme: 2^(bits−1) − 1."""
    return (1 << (bits - 1)) - 1


def stochastic_seed(seed: int, index: int, step: int) -> int:
    """One generator seed per (optimizer seed, parameter index, step): a fixed mix into [0, 2^63)."""
    mixed = (int(seed) * 1_000_003 + int(index)) * 1_000_033 + int(step)
    return mixed % (2**63 - 1)


def _blocks(x: torch.Tensor, block: int, per_row: bool) -> torch.Tensor:
    """x as (blocks, block) fp32, zero-padded (per row of a matrix, or at the tail of the flattened tensor)."""
    x = x.float()
    if per_row:
        m, n = x.shape
        pad = (-n) % block
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(m * ((n + pad) // block), block)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, block)


def _unblock(q: torch.Tensor, shape: torch.Size, per_row: bool) -> torch.Tensor:
    """Inverse of :func:`_blocks` (drops the padding)."""
    if per_row:
        m, n = shape
        return q.reshape(m, -1)[:, :n]
    return q.reshape(-1)[: math.prod(shape)].reshape(shape)


def _round(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """ρ(x): nearest (ties to even) without a generator, stochastic rounding with one (in place on x)."""
    if generator is None:
        return x.round_()
    low = x.floor()
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return low.add_(u.lt_(x.sub_(low)))  # ⌊x⌋ + 1[u < x − ⌊x⌋]


def quantize(x: torch.Tensor, bits: int, block: int, per_row: bool = False, generator: torch.Generator | None = None,
             scheme: str = "absmax") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x`` (module docstring): codes int8 in x's shape (``per_row``) or per padded block,
    scales fp32 (blocks,) — for "minmax" (blocks, 2): scale and zero point. ``generator``: stochastic rounding."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r}: expected one of {SCHEMES}")
    b = _blocks(x, block, per_row)
    if scheme == "absmax":
        top = qmax(bits)
        scale = b.abs().amax(dim=1) / top
        q = _round(b / torch.where(scale > 0, scale, 1.0)[:, None], generator).clamp_(-top, top)
        codes = q.to(torch.int8)
        return (_unblock(codes, x.shape, per_row) if per_row else codes.reshape(-1)), scale
    # Q-GaLore's asymmetric scheme: s = (max − min) / (2^bits − 1), z = clamp(−round(min / s), 0, 2^bits − 1)
    levels = (1 << bits) - 1
    lo, hi = b.amin(dim=1), b.amax(dim=1)
    scale = (hi - lo).clamp_min(1e-5) / levels
    zero = (-(lo / scale)).round_().clamp_(0, levels)
    q = (_round(b / scale[:, None], generator) + zero[:, None]).clamp_(0, levels)
    codes = q.to(torch.uint8)
    return (_unblock(codes, x.shape, per_row) if per_row else codes.reshape(-1)), torch.stack([scale, zero], 1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size | tuple[int, ...], block: int,
               per_row: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """deq(q) = q · s_b (absmax) or (q − z_b) · s_b (minmax: ``scales`` (blocks, 2)), in ``dtype`` (fp32 arithmetic)."""
    q = _blocks(codes, block, per_row) if per_row else codes.reshape(-1, block).float()
    if scales.dim() == 2:
        out = (q - scales[:, 1:2]) * scales[:, 0:1]
    else:
        out = q * scales[:, None].float()
    return _unblock(out, torch.Size(shape), per_row).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes (−8..7) per byte, low nibble first: (k,) int8 (k even) → (k/2,) uint8."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(-1, 2)
    return u[:, 0] | (u[:, 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (k/2,) uint8 → (k,) int8."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], 1).reshape(-1)


def quantize_int4(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed codes, scales)``: x in absmax INT4 over flattened blocks (nearest rounding), two codes per byte."""
    if block % 2:
        raise ValueError(f"INT4 block size must be even (two codes per byte), got {block}")
    codes, scales = quantize(x, 4, block)
    return pack_int4(codes), scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, shape: torch.Size | tuple[int, ...], block: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` up to the rounding."""
    return dequantize(unpack_int4(packed), scales, shape, block, dtype=dtype)
