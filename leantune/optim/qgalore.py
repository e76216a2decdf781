"""Q-GaLore (Zhang et al. 2024, arXiv 2407.08296): GaLore with the trained weights held in INT8, the projectors in INT4,
and a lazy, layer-adaptive subspace refresh.

For a targeted weight held as INT8 codes q with blockwise scales s (``leantune.kernels.int8_linear``), one step is
GaLore's (``galore_adamw.py``: R = project(G), Adam on R, back-projection) on the dequantized weight, in fp32, then a
requantization with stochastic rounding (paper §3.2, Eq. for SR):

    W  = deq(q, s)                                     (fp32; never kept between steps)
    W' = W (1 − η λ) − η α back(N)                     (GaLore's update, P dequantized from INT4: ``lazy_projector``)
    q', s' = quantize(W', SR)                          E[deq(q', s')] = W'  (unbiased: small updates survive on average)

The arithmetic is fp32 whatever the model's dtype: in bf16 (Q-GaLore's code) an update below half a bf16 ulp of the
weight vanishes before SR sees it. The rounding noise is drawn from a generator seeded with (``seed``, the parameter's
index, its step), so DDP ranks draw the same noise without communicating and a resumed run continues bit for bit.

Two classes: ``QGaLoreAdamW`` (moments in fp32 for INT8 weights, in the parameter's dtype otherwise) and
``QGaLoreAdamW8bit`` (bitsandbytes' 8-bit blockwise moments: the paper's optimizer). ``quantize_weights(model)``
turns the model's trainable linears into INT8 (``build_optimizer`` does it for these names; adapter factors stay
float), ``dequantize_weights(model)`` turns them back in memory (``save_pretrained`` already writes float weights: see
``Int8Linear``).

The INT8 weights' gradients are not ``.grad`` (torch has no float gradient for an integer tensor): the linear leaves
``weight.qgrad``, which this optimizer reads, averages over DDP ranks, steps on and frees. So a global
``clip_grad_norm_`` over ``model.parameters()`` does not see them: use ``max_grad_norm_per_param``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from leantune.kernels.int8_linear import DEFAULT_BLOCK, Int8Linear, is_int8_weight
from leantune.kernels.quantize import stochastic_seed
from leantune.optim.galore_adamw import GaLoreAdamW
from leantune.optim.galore_adamw8bit import GaLoreAdamW8bit
from leantune.optim.lazy_projector import LAZY_DEFAULTS, LazyQuantizedSVDProjector
from leantune.optim.projectors import Projector
from leantune.optim.step import ParamStep


class QGaLoreMixin:
    """INT8 weights, INT4 lazy projectors and fp32 stochastic-rounding updates on top of a GaLore Adam class."""

    fusable = False  # the fused kernel writes the weight in its own dtype; here W is requantized after the update
    row_shardable = False
    #: why FSDP2 is refused (``sharded.py`` and :func:`quantize_weights` say it)
    fsdp2_refusal = ("its INT8 weights are made from whole float matrices and keep one scale per block of a row, "
                     "which FSDP2 would shard apart from the codes (and the model is sharded before the optimizer "
                     "exists)")
    state_keys = GaLoreAdamW.state_keys + tuple(k for k in LazyQuantizedSVDProjector.state_keys
                                                if k not in GaLoreAdamW.state_keys)

    def __init__(self, params: Iterable[Any], *args: Any, stochastic_round: bool = True, seed: int = 0,
                 proj_bits: int | None = 4, proj_block: int = 256, lazy_threshold: float | None = 0.4,
                 lazy_queue: int = 5, lazy_factor: float = 2, max_proj_gap: int | None = None, **kwargs: Any) -> None:
        if proj_bits not in (None, 4):
            raise ValueError(f"proj_bits={proj_bits!r}: Q-GaLore stores projectors in 4 bits (4) or not at all (None)")
        if not isinstance(proj_block, int) or proj_block < 2 or proj_block % 2:
            raise ValueError(f"proj_block={proj_block!r}: an even block size >= 2 (two INT4 codes per byte)")
        if lazy_threshold is not None and not 0.0 <= lazy_threshold <= 1.0:
            raise ValueError(f"lazy_threshold={lazy_threshold!r}: a cosine similarity in [0, 1], or None (off)")
        if not isinstance(lazy_queue, int) or lazy_queue < 1:
            raise ValueError(f"lazy_queue={lazy_queue!r}: the number of similarities averaged, >= 1")
        if lazy_factor < 1:
            raise ValueError(f"lazy_factor={lazy_factor!r}: the interval grows by this factor, >= 1")
        if max_proj_gap is not None and max_proj_gap < 1:
            raise ValueError(f"max_proj_gap={max_proj_gap!r}: a step count >= 1, or None (no cap)")
        groups = list(params)
        tensors = [item[1] if isinstance(item, tuple) else item  # torch's (name, tensor) pairs, or tensors
                   for g in groups for item in (g["params"] if isinstance(g, dict) else [g])]
        unbound = [p for p in tensors if isinstance(p, torch.Tensor) and p.dtype == torch.int8 and
                   not is_int8_weight(p)]
        if unbound:
            raise ValueError(f"{len(unbound)} int8 parameter(s) are not the weight of a leantune Int8Linear (or lost "
                             "their binding): Q-GaLore would have no gradient for them. Make INT8 layers with "
                             "leantune.optim.quantize_weights(model), and build the optimizer on that model.")
        params = groups
        self.stochastic_round, self.seed = bool(stochastic_round), int(seed)
        lazy = dict(LAZY_DEFAULTS, proj_bits=proj_bits, proj_block=proj_block, lazy_threshold=lazy_threshold,
                    lazy_queue=lazy_queue, lazy_factor=lazy_factor, max_proj_gap=max_proj_gap)
        extra = {**(kwargs.pop("_extra_defaults", None) or {}), **lazy}
        super().__init__(params, *args, _extra_defaults=extra, **kwargs)

    def _validate_low_rank(self, index: int, group: dict[str, Any]) -> None:
        super()._validate_low_rank(index, group)
        if group["projector"] != "svd":
            raise ValueError(f"param group {index}: Q-GaLore's lazy INT4 projector is an SVD basis; projector="
                             f"{group['projector']!r} is not supported (use 'svd', or galore_adamw with that projector)")

    # ---- the INT8 weights' gradients ---------------------------------------------------------------------------
    def _init_layerwise(self, layerwise: bool, accumulation_steps: int) -> None:
        super()._init_layerwise(layerwise, accumulation_steps)
        if not self.layerwise:
            return
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if is_int8_weight(p):  # no accumulate-grad hook for an integer tensor: the linear calls this one
                    self._group_index[p] = gi
                    p.qgrad_hook = self._layerwise_hook

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        return getattr(p, "qgrad", None) if is_int8_weight(p) else p.grad

    def release_grad(self, p: torch.Tensor) -> None:
        if is_int8_weight(p):
            p.qgrad = None
        else:
            p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if is_int8_weight(p):
                    p.qgrad = None

    def _step_param(self, p: torch.Tensor, group: dict[str, Any], finite: bool | None = None) -> None:
        if is_int8_weight(p) and getattr(p, "qgrad", None) is not None:
            g = p.qgrad.float()  # fp32 arithmetic (module docstring)
            if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                    torch.distributed.get_world_size() > 1:  # DDP does not see this gradient: average it here
                g = g.clone() if g is p.qgrad else g
                torch.distributed.all_reduce(g)
                g.div_(torch.distributed.get_world_size())
            p.qgrad = g
        super()._step_param(p, group, finite)
        if is_int8_weight(p):
            p.qgrad = None

    # ---- projector and update ---------------------------------------------------------------------------------
    def projector_for(self, state: dict[str, Any], group: dict[str, Any], key: torch.Tensor) -> Projector:
        base = super().projector_for(state, group, key)
        return LazyQuantizedSVDProjector(state, base.rank, base.update_proj_gap, base.scale, base.raw_signs, group)

    def update(self, s: ParamStep) -> None:
        """GaLore's step on deq(W) in fp32, then W requantized with stochastic rounding (module docstring)."""
        if not is_int8_weight(s.W):
            return super().update(s)
        codes = s.W
        layer: Int8Linear = codes.int8_module
        s.W = layer.dequantized(torch.float32)
        super().update(s)
        generator = None
        if self.stochastic_round:
            seed = stochastic_seed(self.seed, self._param_seed[codes], s.state["step"])
            generator = torch.Generator(device=codes.device).manual_seed(seed)
        layer.set_weight(s.W, generator)

    def svd_counts(self) -> dict[int, int]:
        """SVDs each projected parameter ran (by its index in the optimizer)."""
        return {self._param_seed[p]: st["svd_count"] for p, st in self.state.items() if "svd_count" in st}


class QGaLoreAdamW(QGaLoreMixin, GaLoreAdamW):
    """Q-GaLore with Adam moments in fp32 (INT8 weights) or the parameter's dtype (float parameters).

    Args (besides ``GaLoreAdamW``'s): ``stochastic_round`` (False: nearest rounding), ``seed`` (of the rounding
    noise), ``proj_bits`` (4, or None: projectors not quantized), ``proj_block`` (256), ``lazy_threshold`` (0.4, or
    None: refresh every ``update_proj_gap`` steps), ``lazy_queue`` (5), ``lazy_factor`` (2), ``max_proj_gap``
    (None: no cap). With float weights, ``proj_bits=None`` and ``lazy_threshold=None`` it is ``GaLoreAdamW``.
    """

    supports_rotate = True


class QGaLoreAdamW8bit(QGaLoreMixin, GaLoreAdamW8bit):
    """Q-GaLore with bitsandbytes' 8-bit blockwise Adam moments (the paper's optimizer); arguments as
    :class:`QGaLoreAdamW` plus ``min_8bit_size``."""

    state_keys = QGaLoreMixin.state_keys + ("state1", "state2", "absmax1", "absmax2")


# ---- the model side ---------------------------------------------------------------------------------------------
def quantize_weights(model: nn.Module, names: Sequence[str] | None = None, block_size: int = DEFAULT_BLOCK) -> list[str]:
    """Replace trainable ``nn.Linear`` (and transformers ``Conv1D``) modules by :class:`Int8Linear` (nearest rounding);
    ``names``: the weights' parameter names to convert (``find_target_weights``), None: every trainable linear but the
    output head. A peft model is left as it is (Q-GaLore's INT8 weights are for full-parameter training; adapter
    factors and ``modules_to_save`` copies stay float, and are still projected with INT4 lazy projectors). Returns
    the converted module names."""
    if hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return []
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(f"Q-GaLore on an FSDP2-sharded model is not supported: {QGaLoreMixin.fsdp2_refusal}. "
                         "Train it under DDP (tested), or use galore_adamw8bit under FSDP2.")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = None if names is None else {n[: -len(".weight")] if n.endswith(".weight") else n for n in names}
    converted = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Conv1D)) or module is head:
            continue
        if not module.weight.requires_grad or (wanted is not None and name not in wanted):
            continue
        conv1d = isinstance(module, Conv1D)
        if conv1d:  # y = x W + b with W (in, out): the same linear with Wᵀ
            stand_in = nn.Linear(module.weight.shape[0], module.weight.shape[1], module.bias is not None,
                                 device=module.weight.device, dtype=module.weight.dtype)
            stand_in.weight = nn.Parameter(module.weight.detach().t())
            stand_in.bias = module.bias
            module = stand_in
        new = Int8Linear.from_linear(module, block_size)
        new.from_conv1d = conv1d
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        converted.append(name)
    return converted


def dequantize_weights(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every :class:`Int8Linear` by an ``nn.Linear`` (a ``Conv1D`` where it replaced one) holding deq(W) in
    ``dtype`` (default: its bias's dtype, else fp32), e.g. before ``save_pretrained``. Returns the module names."""
    names = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Int8Linear):
            continue
        target = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
        W = module.dequantized(torch.float32)
        if module.from_conv1d:
            linear = Conv1D(module.out_features, module.in_features).to(device=module.weight.device, dtype=target)
            W = W.t()
        else:
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                               device=module.weight.device, dtype=target)
        with torch.no_grad():
            linear.weight.copy_(W)
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        names.append(name)
    return names
