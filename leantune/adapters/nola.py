"""NOLA: LoRA whose factors are linear combinations of frozen pseudo-random bases.

Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random Basis" (ICLR 2024)::

    ΔW = s · B A,                 s = nola_alpha / r,   W0 ∈ R^{out×in}
    A  = A0 + Σ_{i=1..k} α_i A_i   A_i ∈ R^{r×in}   entries U(-1, 1)/√k   (frozen, regenerated from a seed)
    B  =      Σ_{j=1..l} β_j B_j   B_j ∈ R^{out×r}  entries U(-1, 1)/√l   (frozen, regenerated from a seed)
    A0 ∈ R^{r×in}, entries U(-1, 1)/√in (kaiming-uniform, a=√5, as LoRA's A; frozen, regenerated)
    trained: α ∈ R^k, β ∈ R^l, initialised to 0      →  k + l parameters per matrix, whatever r, in, out

Initialisation convention: the official LLM code's (GPT-2/LLaMA): ``α = β = 0`` gives ``B = 0``, so
``ΔW = 0`` at init, while ``∂L/∂β_j = s·<∂L/∂B, B_j>`` is non-zero because ``A = A0 ≠ 0`` (the same
mechanism as LoRA's ``B = 0``). Unlike that code, ``A0`` is regenerated from the seed too, so the
checkpoint holds only α, β, one seed per matrix and a small fingerprint of the bases.

The bases are never stored: a custom autograd function regenerates them chunk by chunk in forward and
backward (``∂L/∂α_i = <∂L/∂A, A_i>``, ``∂L/∂β_j = <∂L/∂B, B_j>``), unless ``cache_bases=True`` asks to
keep them per device. They are generated on the CPU by a local ``torch.Generator`` (the global RNG is
never touched) in float32, then moved, so a GPU-trained adapter regenerates the same bases on a CPU. The
fingerprint saved with the adapter is checked on load and a mismatch raises. Outside autograd (eval,
``torch.no_grad``) the factors ``A``, ``B`` are materialised once and reused until α or β change.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from leantune._utils import PEFT_PREFIX, scale_columns
from leantune._validation import check_bool, check_int, check_number

from .low_rank import LowRankConfig, LowRankLayer, LowRankModel
from .registration import LeanTuneType, register_tuner

BASIS_CHUNK = 64  # bases generated per generator call; part of the (seed → basis) format, do not change
FINGERPRINT_SIZE = 8


@dataclass
class NolaConfig(LowRankConfig):
    """Configuration of a NOLA adapter.

    Args:
        r: rank of ``B A`` (costs no trainable parameters, only compute).
        num_basis_A: k, number of random bases combined into A (k trainable coefficients per matrix).
        num_basis_B: l, number of random bases combined into B (l trainable coefficients per matrix).
        nola_alpha: scale numerator, ``s = nola_alpha / r``.
        seed: base seed; each adapted module derives its own seed from it and its module name.
        cache_bases: keep the generated bases in memory per device instead of regenerating them at every
            forward and backward (faster, costs ``(k·r·in + l·out·r)`` floats per matrix; never saved).
        init_weights: ``True`` (α = β = 0: identity at start) or ``False`` (α, β ~ N(0, 0.1²): non-identity, for
            tests).
    """

    num_basis_A: int = field(default=256, metadata={"help": "k: bases (and coefficients) for A."})
    num_basis_B: int = field(default=256, metadata={"help": "l: bases (and coefficients) for B."})
    nola_alpha: float = field(default=8.0, metadata={"help": "Scale numerator, s = nola_alpha / r."})
    seed: int = field(default=0, metadata={"help": "Base seed of the per-module basis seeds."})
    cache_bases: bool = field(default=False, metadata={"help": "Keep generated bases in memory per device."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.NOLA
        check_int(self, "num_basis_A", minimum=1)
        check_int(self, "num_basis_B", minimum=1)
        check_number(self, "nola_alpha", minimum=0, strict=True)
        check_int(self, "seed", minimum=0)
        check_bool(self, "cache_bases")


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (the same on every platform and Python run)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _uniform(shape: tuple[int, ...], seed: int, bound: float) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def basis_chunks(seed: int, kind: str, count: int, shape: tuple[int, int]) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, bases[start:start+c])`` of the ``count`` bases of one factor, each U(-1,1)/√count."""
    bound = 1.0 / math.sqrt(count)
    for start in range(0, count, BASIS_CHUNK):
        size = min(BASIS_CHUNK, count - start)
        yield start, _uniform((size, *shape), derive_seed(seed, kind, start // BASIS_CHUNK), bound)


def offset_A0(seed: int, r: int, in_features: int) -> torch.Tensor:
    """The frozen non-zero offset ``A0`` (r×in), U(-1,1)/√in like LoRA's kaiming-uniform A."""
    return _uniform((r, in_features), derive_seed(seed, "A0"), 1.0 / math.sqrt(in_features))


def basis_fingerprint(seed: int, r: int, in_features: int, out_features: int, k: int, l: int) -> torch.Tensor:
    """A few values of A0 and of the first bases of A and B, saved to detect a changed generator on load.

    Kept as the int32 bit patterns of the fp32 values: an integer buffer is never cast with the adapter (to bf16 and
    back under ``autocast_adapter_dtype``), so it compares exactly on load."""
    a0 = offset_A0(seed, r, in_features).flatten()[: FINGERPRINT_SIZE // 2]
    _, a_first = next(basis_chunks(seed, "A", k, (r, in_features)))
    _, b_first = next(basis_chunks(seed, "B", l, (out_features, r)))
    tail = FINGERPRINT_SIZE - a0.numel()
    values = torch.cat([a0, a_first.flatten()[: tail // 2], b_first.flatten()[: tail - tail // 2]])
    return values.contiguous().view(torch.int32).clone()


def fingerprint_matches(saved: torch.Tensor, regenerated: torch.Tensor) -> bool:
    """The saved fingerprint equals the regenerated bits (int32); a float fingerprint of an older save must equal the
    regenerated values rounded to its dtype, or through bf16/fp16 and back (adapter dtype casts)."""
    if not saved.is_floating_point():
        return torch.equal(saved, regenerated)
    values = regenerated.view(torch.float32)
    return any(torch.equal(saved, values.to(d).to(saved.dtype)) for d in (saved.dtype, torch.bfloat16, torch.float16))


ChunkSource = Callable[[str], Iterator[tuple[int, torch.Tensor]]]  # kind ("A"/"B") -> chunks on the right device


def combine(coefficients: torch.Tensor, chunks: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``Σ_i c_i M_i`` without holding more than one chunk of bases."""
    total = None
    for start, bases in chunks:
        part = torch.tensordot(coefficients[start : start + bases.shape[0]], bases.to(coefficients.dtype), dims=1)
        total = part if total is None else total + part
    return total


def project(grad: torch.Tensor, chunks: Iterator[tuple[int, torch.Tensor]], count: int) -> torch.Tensor:
    """``(<grad, M_i>)_i`` for all bases M_i: the gradient of ``Σ c_i M_i`` with respect to the c_i."""
    out = grad.new_empty(count)
    for start, bases in chunks:
        out[start : start + bases.shape[0]] = torch.tensordot(bases.to(grad.dtype), grad, dims=2)
    return out


class NolaFunction(torch.autograd.Function):
    """``y = s · (x (A diag γ)ᵀ) Bᵀ`` with ``A = A0 + Σ α_i A_i``, ``B = Σ β_j B_j``; bases regenerated in backward.

    ``input_scale`` γ is None except on a folded norm's consumer (``leantune.memory``, see
    :class:`~leantune.adapters.low_rank.LowRankLayer`). Saved for backward: ``x``, ``h`` and the small factors
    ``A diag γ`` (r×in), ``B`` (out×r) and γ; never the k + l bases, which ``source`` regenerates (or takes from the
    per-device cache) chunk by chunk.
    """

    @staticmethod
    def forward(ctx, x, alpha, beta, a0, source: ChunkSource, scale: float,  # type: ignore[override]
                input_scale: Optional[torch.Tensor] = None):
        # a0 is a constant (no gradient); `source(kind)` yields the bases on the coefficients' device
        a = a0.to(alpha.dtype) + combine(alpha, source("A"))
        if input_scale is not None:
            a = scale_columns(a, input_scale)
        b = combine(beta, source("B"))
        h = nn.functional.linear(x, a)
        ctx.source, ctx.scale, ctx.k, ctx.l = source, scale, alpha.numel(), beta.numel()
        ctx.save_for_backward(x, h, a, b, input_scale)
        return nn.functional.linear(h, b) * scale

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, h, a, b, input_scale = ctx.saved_tensors
        s = ctx.scale
        grad_h = (grad_y @ b) * s  # (…, r)
        grad_x = grad_h @ a if ctx.needs_input_grad[0] else None
        grad_alpha = grad_beta = None
        if ctx.needs_input_grad[1]:
            grad_a = grad_h.reshape(-1, a.shape[0]).T @ x.reshape(-1, a.shape[1])  # ∂L/∂(A diag γ) (r×in)
            if input_scale is not None:
                grad_a = scale_columns(grad_a, input_scale)  # chain rule back to A
            grad_alpha = project(grad_a, ctx.source("A"), ctx.k)
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, b.shape[0]).T @ h.reshape(-1, b.shape[1]) * s  # ∂L/∂B (out×r)
            grad_beta = project(grad_b, ctx.source("B"), ctx.l)
        return grad_x, grad_alpha, grad_beta, None, None, None, None


class NolaLayer(LowRankLayer):
    """NOLA layer: trainable coefficients ``nola_alpha`` (k,), ``nola_beta`` (l,); see the module docstring."""

    adapter_layer_names = ("nola_alpha", "nola_beta")
    other_param_names = ("nola_seed", "nola_fingerprint", "nola_shape", "r", "scaling", "num_basis", "cache_bases")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NolaConfig, module_name: str) -> None:
        super().__init__(base_layer)
        self.nola_alpha = nn.ParameterDict({})
        self.nola_beta = nn.ParameterDict({})
        self.nola_seed = BufferDict({}, persistent=True)
        self.nola_fingerprint = BufferDict({}, persistent=True)
        self.nola_shape = BufferDict({}, persistent=True)  # (out, in): names a mismatched base on load
        self.scaling: dict[str, float] = {}
        self.num_basis: dict[str, tuple[int, int]] = {}
        self.cache_bases: dict[str, bool] = {}
        self._basis_cache: dict[tuple, torch.Tensor] = {}  # only filled when cache_bases; never saved
        self._factor_cache: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: NolaConfig, module_name: str) -> None:
        k, l = config.num_basis_A, config.num_basis_B
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.nola_alpha / config.r
        self.num_basis[adapter_name] = (k, l)
        self.cache_bases[adapter_name] = config.cache_bases
        seed = derive_seed(config.seed, module_name)
        self.nola_seed[adapter_name] = torch.tensor(seed, dtype=torch.int64)
        self.nola_fingerprint[adapter_name] = self._fingerprint(adapter_name)
        self.nola_shape[adapter_name] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64)
        random = config.init_weights is False  # non-identity, for tests
        self.nola_alpha[adapter_name] = nn.Parameter(torch.randn(k) * 0.1 if random else torch.zeros(k))
        self.nola_beta[adapter_name] = nn.Parameter(torch.randn(l) * 0.1 if random else torch.zeros(l))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- bases ---------------------------------------------------------------------------------------------
    def _seed(self, adapter: str) -> int:
        return int(self.nola_seed[adapter].item())

    def _fingerprint(self, adapter: str, seed: Optional[int] = None) -> torch.Tensor:
        k, l = self.num_basis[adapter]
        seed = self._seed(adapter) if seed is None else seed
        return basis_fingerprint(seed, self.r[adapter], self.in_features, self.out_features, k, l)

    def chunk_source(self, adapter: str, device: torch.device) -> ChunkSource:
        """A function ``kind -> chunks`` yielding this adapter's bases on ``device`` (regenerated or cached)."""
        seed, r = self._seed(adapter), self.r[adapter]
        k, l = self.num_basis[adapter]
        spec = {"A": (k, (r, self.in_features)), "B": (l, (self.out_features, r))}

        def source(kind: str) -> Iterator[tuple[int, torch.Tensor]]:
            count, shape = spec[kind]
            if not self.cache_bases[adapter]:
                return ((start, bases.to(device)) for start, bases in basis_chunks(seed, kind, count, shape))
            key = (adapter, kind, seed, str(device))
            if key not in self._basis_cache:
                self._basis_cache[key] = [(s, b.to(device)) for s, b in basis_chunks(seed, kind, count, shape)]
            return iter(self._basis_cache[key])

        return source

    def materialized_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` computed from the current coefficients (differentiable through plain autograd)."""
        alpha, beta = self.nola_alpha[adapter], self.nola_beta[adapter]
        source = self.chunk_source(adapter, alpha.device)
        a0 = offset_A0(self._seed(adapter), self.r[adapter], self.in_features).to(alpha.device, alpha.dtype)
        return a0 + combine(alpha, source("A")), combine(beta, source("B"))

    # --- LowRankLayer interface -------------------------------------------------------------------------------
    def lowrank_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·B, A)``: the materialised factors, for merging and export to a plain LoRA."""
        a, b = self.materialized_factors(adapter)
        return self.scaling[adapter] * b, a

    def forward_factors(self, adapter: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """None in training: differentiating the materialised factors would make autograd save the basis chunks
        that :class:`NolaFunction` regenerates instead, so the fused kernel leaves NOLA on its own path."""
        return None if torch.is_grad_enabled() else self.lowrank_factors(adapter)

    def adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        alpha, beta = self.nola_alpha[adapter], self.nola_beta[adapter]
        if torch.is_grad_enabled() and (alpha.requires_grad or beta.requires_grad or x.requires_grad):
            a0 = offset_A0(self._seed(adapter), self.r[adapter], self.in_features).to(alpha.device)
            source = self.chunk_source(adapter, alpha.device)
            return NolaFunction.apply(x, alpha, beta, a0, source, self.scaling[adapter], self.input_scale())
        # inference: materialise A and B once, reuse them until the coefficients change. The cache is keyed on the
        # coefficients' values (k + l numbers): version counters miss updates made through `.data` (as some
        # optimizer wrappers do), which would silently serve stale factors.
        cached = self._factor_cache.get(adapter)
        if cached is None or not (torch.equal(cached[0][0], alpha) and torch.equal(cached[0][1], beta)):
            with torch.no_grad():
                cached = ((alpha.detach().clone(), beta.detach().clone()), self.lowrank_factors(adapter))
            self._factor_cache[adapter] = cached
        b_eff, a_eff = cached[1]
        return nn.functional.linear(self.input_linear(x, a_eff), b_eff)

    # --- loading: refuse bases that differ from the ones the adapter was trained with ------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        for adapter in list(self.nola_seed.keys()):
            shape_key = f"{prefix}nola_shape.{adapter}"
            if shape_key in state_dict:
                saved_shape = tuple(int(v) for v in state_dict[shape_key].tolist())
                if saved_shape != (self.out_features, self.in_features):
                    layer = prefix.removeprefix(PEFT_PREFIX).rstrip(".")
                    raise ValueError(
                        f"This adapter was trained on a different base model: for {layer!r} the checkpoint has "
                        f"shape {saved_shape} but this model needs {(self.out_features, self.in_features)}. "
                        "Load it onto the base model it was trained with."
                    )
            seed_key, print_key = f"{prefix}nola_seed.{adapter}", f"{prefix}nola_fingerprint.{adapter}"
            if seed_key in state_dict and print_key in state_dict:
                seed = int(state_dict[seed_key].item())
                saved = state_dict[print_key].detach().cpu()
                regenerated = self._fingerprint(adapter, seed)
                if not fingerprint_matches(saved, regenerated):
                    raise RuntimeError(
                        f"NOLA module {prefix.rstrip('.')!r}, adapter {adapter!r}: the random bases regenerated from "
                        f"seed {seed} do not match the fingerprint saved with the adapter (saved {saved.tolist()}, "
                        f"regenerated {regenerated.tolist()}). The adapter was trained with a different basis "
                        "generator (another torch version, or num_basis_A/num_basis_B/r/shape changed); load it "
                        "with the torch version and config it was trained with."
                    )
        self._factor_cache.clear()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )


class NolaModel(LowRankModel):
    """peft tuner that wraps target modules with :class:`NolaLayer`."""

    prefix = "nola_"
    tuner_layer_cls = NolaLayer
    any_dtype_keys = ("nola_fingerprint",)  # int32 bits now, float in older saves
    integer_keys = ("nola_seed", "nola_shape", "nola_fingerprint")


register_tuner(LeanTuneType.NOLA, NolaConfig, NolaModel)
