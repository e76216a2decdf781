"""LoftQ-style initialisation (Li et al., arXiv 2310.08659, Algorithm 1) for peft LoRA and leantune's adapters.

QLoRA starts an adapter at ΔW = 0 on a quantized base, so training first has to undo the quantization error
``W − Q(W)``. LoftQ instead alternates quantization and a rank-r fit of the residual, starting from ``L₀R₀ = 0``:

    Q_t = q(W − L_{t−1} R_{t−1}),      (L_t, R_t) = rank-r SVD of (W − Q_t),  L = U √S,  R = √S Vᵀ

and starts training from the base ``Q_T`` with ``ΔW = L_T R_T``, the part of the quantization error a rank-r update
can hold. ``q`` is bitsandbytes' NF4 (``"nf4"``, block 64: the 4-bit base QLoRA uses; exact on the CPU through
``bitsandbytes.functional``) or round-to-nearest int4 with a min/max grid per group (``"int4"``).

peft ships LoftQ for LoRA only, and its compute is hard-wired to CUDA/XPU (it fails on a CPU-only torch); it also
sets ``lora_B = L``, ``lora_A = R`` without dividing by the scale α/r, so its init is exact only when α = r. Here
every method receives ``ΔW = L R`` in its own parameterisation through one hook,
:meth:`~leantune.adapters.low_rank.LowRankLayer.absorb_lowrank` (ALLoRA: B = L, A = R; DyLoRA: B = L·r/α, A = R;
LoRA-XS / LoRA-SB: frozen B = L, A = R with R_mid = I/s; peft LoRA: B = L/s, A = R). NOLA's update is a
combination of fixed random bases and cannot hold a given rank-r matrix, so it is refused.

The base weight becomes ``Q_T`` (dequantized, in the base dtype), which
:func:`quantize_base_4bit` then turns into bitsandbytes ``Linear4bit`` layers: NF4 re-quantization of an NF4 grid is
exact (every block's absmax is one of its own values), so the 4-bit model computes exactly ``Q_T + L R``.

L4Q (:mod:`leantune.adapters.l4q`) quantizes ``W0 + α B A`` itself, so its LoftQ start is a hand-off: the
alternation runs with L4Q's own quantizer (its bits and groups, the min/max grid), the base becomes ``Q_T``, the
adapter ``α B A = L_T R_T`` and the step and zero point the grid of the last quantization. The first L4Q forward
then quantizes LoftQ's reconstruction ``Q_T + L_T R_T`` (≈ W) on the grid ``Q_T`` lies on (with the adapter off
it computes ``Q_T`` exactly); the base is still held in full precision (L4Q refuses a 4-bit base).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.utils import resolve_quantization_backend
from torch import nn
from tqdm.auto import tqdm

from leantune._utils import LeanTuneError, one_bnb_cpu_path
from leantune.kernels.l4q import dequantize_groups, quantize_groups

from .l4q import L4QLayer, initial_step
from .lora_xs import truncated_svd
from .low_rank import LowRankLayer

QUANTIZERS = ("nf4", "int4")


def nf4_roundtrip(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``deq(q(W))`` with bitsandbytes' NF4 (absmax per block of ``blocksize`` numbers), in W's dtype."""
    packed, state = bnbf.quantize_4bit(weight.float().contiguous(), blocksize=blocksize, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def int4_roundtrip(weight: torch.Tensor, group: int = 64, bits: int = 4) -> torch.Tensor:
    """``deq(q(W))`` with round-to-nearest int4 (``bits``) on a min/max grid per group of ``group`` inputs of a row
    (L4Q's ``"minmax"`` grid and quantizer, in float64)."""
    w = weight.double()
    scale, zero = initial_step(w, w.shape[1] // group, bits, "minmax")
    _, q = quantize_groups(w, scale, zero, bits)
    return dequantize_groups(q, scale, zero, torch.float64).to(weight.dtype)


def quantizer(name: str, block: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "nf4":
        return lambda w: nf4_roundtrip(w, block)
    if name == "int4":
        return lambda w: int4_roundtrip(w, block)
    raise ValueError(f"quant_type must be one of {QUANTIZERS}, got {name!r}")


@dataclass
class LoftQResult:
    """``W ≈ base + left @ right``; ``errors[t]`` = ‖W − Q_t − L_t R_t‖_F / ‖W‖_F (``errors[0]``: ‖W − Q(W)‖ / ‖W‖)."""

    base: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    errors: list[float] = field(default_factory=list)
    #: what the last quantization rounded, ``W − L_{T−1} R_{T−1}`` (``base = q(quantized_from)``)
    quantized_from: torch.Tensor | None = None


def loftq(weight: torch.Tensor, rank: int, quantize: Callable[[torch.Tensor], torch.Tensor],
          iters: int = 5) -> LoftQResult:
    """LoftQ's alternation (module docstring) for one ``(out, in)`` weight, in float32 (float64 for float64)."""
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1, got {iters}")
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    norm = float(torch.linalg.matrix_norm(w)) or 1.0
    q, rounded = quantize(w), w
    errors = [float(torch.linalg.matrix_norm(w - q)) / norm]
    left = torch.zeros(w.shape[0], rank, dtype=w.dtype)
    right = torch.zeros(rank, w.shape[1], dtype=w.dtype)
    for step in range(iters):
        if step:
            rounded = w - left @ right
            q = quantize(rounded)
        u, s, vh = truncated_svd(w - q, rank)
        root = s.to(w.dtype).sqrt()
        left, right = u.to(w.dtype) * root, root[:, None] * vh.to(w.dtype)
        errors.append(float(torch.linalg.matrix_norm(w - q - left @ right)) / norm)
    return LoftQResult(q, left, right, errors, rounded)


def _absorb_peft_lora(layer: LoraLinear, adapter: str, left: torch.Tensor, right: torch.Tensor) -> None:
    scale = layer.scaling[adapter]
    layer.lora_B[adapter].weight.copy_(left / scale)  # α/r honoured (peft's own LoftQ omits it)
    layer.lora_A[adapter].weight.copy_(right)


@torch.no_grad()
def loftq_init(model: nn.Module, adapter: str = "default", quant_type: str = "nf4", block: int = 64,
               iters: int = 5, progress: bool = True) -> dict[str, list[float]]:
    """Initialise every adapted linear of ``model`` (a PeftModel on a full-precision base) by LoftQ: its base weight
    becomes ``Q_T`` and its adapter holds ``L_T R_T`` (module docstring). Returns ``{module: errors}`` (relative
    Frobenius errors, ``[0]`` is plain quantization's). Follow with :func:`quantize_base_4bit` for a 4-bit base.
    L4Q layers always alternate with their own quantizer (``quant_type`` and ``block`` do not apply to them)."""
    quantize = quantizer(quant_type, block)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, LowRankLayer, L4QLayer))]
    if not targets:
        raise LeanTuneError("loftq_init found no peft LoRA or leantune low-rank layer in the model")
    report = {}
    for name, layer in tqdm(targets, desc="LoftQ", disable=not progress):
        base = layer.get_base_layer()
        if type(base) is not nn.Linear:
            raise LeanTuneError(f"{name}: LoftQ needs the full-precision nn.Linear weight to re-quantize, found "
                                f"{type(base).__name__}; load the base in bf16/fp32, run loftq_init, then "
                                "quantize_base_4bit")
        if adapter not in layer.r:
            continue
        if isinstance(layer, L4QLayer):  # its own quantizer (bits, groups) and its grid: module docstring
            groups, bits = layer.l4q_scale[adapter].shape[1], layer.bits[adapter]
            quantize_l4q = lambda w: int4_roundtrip(w, w.shape[1] // groups, bits)  # noqa: E731
            result = loftq(base.weight, layer.r[adapter], quantize_l4q, iters)
            layer.absorb_lowrank(adapter, result.left, result.right,
                                 grid=initial_step(result.quantized_from.double(), groups, bits, "minmax"))
        elif isinstance(layer, LoraLinear):
            result = loftq(base.weight, layer.r[adapter], quantize, iters)
            _absorb_peft_lora(layer, adapter, result.left, result.right)
        else:
            result = loftq(base.weight, layer.r[adapter], quantize, iters)
            layer.absorb_lowrank(adapter, result.left, result.right)
        base.weight.copy_(result.base.to(base.weight.dtype))
        report[name] = result.errors
    return report


def quantize_base_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.float32, block: int = 64) -> int:
    """Replace the base ``nn.Linear`` of every adapted layer by a bitsandbytes NF4 ``Linear4bit`` holding the same
    (already NF4-gridded) weight; returns how many were replaced. Exact after :func:`loftq_init` with ``"nf4"``."""
    count = 0
    for layer in [m for m in model.modules() if isinstance(m, (LoraLinear, LowRankLayer))]:
        base = layer.get_base_layer()
        if type(base) is not nn.Linear:
            continue
        four = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                                 compute_dtype=compute_dtype, quant_type="nf4")
        four.weight = bnb.nn.Params4bit(base.weight.data.float().contiguous(), requires_grad=False,
                                        quant_type="nf4", blocksize=block,
                                        compress_statistics=False)._quantize("cpu")  # fp32 absmax: exact
        one_bnb_cpu_path(four)  # else an eval forward on an AVX512-BF16 CPU rounds that absmax to bf16
        if base.bias is not None:
            four.bias = nn.Parameter(base.bias.data.clone(), requires_grad=False)
        layer.base_layer = four
        if isinstance(layer, LowRankLayer):
            layer.quantization_backend = resolve_quantization_backend(four)
        count += 1
    return count


__all__ = ["LoftQResult", "QUANTIZERS", "int4_roundtrip", "loftq", "loftq_init", "nf4_roundtrip",
           "quantize_base_4bit", "quantizer"]
