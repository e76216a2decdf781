"""L4Q (Jeon, Kim, Kim; arXiv 2402.04902, ACL 2025): LoRA merged into the weight *before* a learned-step quantizer.

    y = x · FQ(W0 + α·B A)ᵀ + b,      FQ(W') = (clamp(round(W'/s + z), Q_n, Q_p) − z) · s     per group of g inputs

Only ``A``, ``B`` and the per-group step ``s`` and zero point ``z`` train (LSQ+ straight-through gradients with LSQ's
scale ``γ = 1/√(g·Q_p)``; :mod:`leantune.kernels.l4q` has every formula). Training therefore optimises the very
integer model that is served: ``leantune export --to quantized`` writes ``(q, s, z)`` into a transformers folder
(torchao ``IntxWeightOnlyConfig``) whose outputs equal the training-time forward bit for bit.

What is held in memory. The paper (and this module) keeps the full-precision ``W0`` frozen, like LoRA on a bf16 base;
the quantizer needs it to re-round ``W0 + αBA`` every step (a 4-bit base cannot be re-rounded onto a new grid), so a
bitsandbytes-quantized base is refused. What lives from forward to backward is what LoRA saves (the input); the
quantized weight is recomputed in backward (L4Q §3.3).

Initialisation. ``A`` Kaiming-uniform, ``B = 0`` (so ``W' = W0`` at start), and per group of ``W0``:

* ``"lsq+"`` (default; LSQ+ arXiv 2004.09576 §3.3, the L4Q peft code): ``s = max(|μ−3σ|, |μ+3σ|) / 2^(b−1)``, z = 0;
* ``"minmax"``: round-to-nearest's asymmetric grid ``s = (max − min)/(Q_p − Q_n)``, ``z = Q_n − min/s`` — the model
  before training is then exactly the plain RTN-quantized model (the baseline a served QLoRA merge starts from);
* ``"absmax"`` (the L4Q lit-gpt path): ``s = max|W0| / Q_p``, z = 0.

Merging writes ``Ŵ`` (the dequantized served weight) into the base weight; the original is kept on the layer until
``unmerge`` or ``merge_and_unload`` (which drops the layer), so unmerge restores it exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from leantune._validation import check_choice, check_int, check_number
from leantune.kernels.l4q import l4q_linear, lsq_gradient_scale, qrange, served_weight

from .low_rank import LowRankConfig
from .registration import LeanTuneType, register_tuner
from .tuner_base import LeanTuneTuner

STEP_INITS = ("lsq+", "minmax", "absmax")
WARMUP_MODES = ("lora", "quantized_base")


@dataclass
class L4QConfig(LowRankConfig):
    """Configuration of an L4Q adapter (defaults: the L4Q code's r = 4, α = 8, 4 bits, groups of 128).

    Args:
        r: LoRA rank inside the quantizer.
        lora_alpha: scale numerator, ``α = lora_alpha / r``.
        bits: bits of the served integer weight (2..8).
        group_size: input columns sharing one step and zero point (must divide every adapted layer's input size);
            ``None`` means one group per output row (per-channel).
        step_init: how ``s`` and ``z`` start: ``"lsq+"``, ``"minmax"`` or ``"absmax"`` (module docstring).
        gradient_scale: scale of the step and zero-point gradients; ``None`` is LSQ's ``1/√(g·Q_p)``.
        init_weights: ``True`` (B = 0: the quantized base at start) or ``False`` (B random as well: for tests).
        warmup_steps: optimizer steps trained before the quantizer takes the adapter in (0: from the start); then
            ``s`` and ``z`` are initialised again, by ``step_init``, from ``W0 + αBA``. Needs ``LeanTuneCallback``
            (which tells the model each step); a loaded adapter always computes the quantized forward.
        warmup_mode: during warm-up ``"lora"`` (the L4Q code: ``x(W0 + αBA)ᵀ``, unquantized) or
            ``"quantized_base"`` (the paper's "warm up Q(W) + αAB": ``x FQ(W0)ᵀ + α x(BA)ᵀ``, s and z frozen).
    """

    r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "Scale numerator, alpha = lora_alpha / r."})
    bits: int = field(default=4, metadata={"help": "Bits of the served integer weight."})
    group_size: Optional[int] = field(default=128, metadata={"help": "Inputs per step; None: per output row."})
    step_init: str = field(default="lsq+", metadata={"help": "'lsq+', 'minmax' or 'absmax'."})
    gradient_scale: Optional[float] = field(default=None, metadata={"help": "None: LSQ's 1/sqrt(g*Q_p)."})
    warmup_steps: int = field(default=0, metadata={"help": "Steps before the quantizer takes the adapter in."})
    warmup_mode: str = field(default="lora", metadata={"help": "'lora' or 'quantized_base'."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.L4Q
        check_number(self, "lora_alpha", minimum=0, strict=True)
        check_int(self, "bits", minimum=2, maximum=8)
        check_int(self, "group_size", minimum=1, optional=True)
        check_choice(self, "step_init", STEP_INITS)
        check_number(self, "gradient_scale", minimum=0, strict=True, optional=True)
        check_int(self, "warmup_steps", minimum=0)
        check_choice(self, "warmup_mode", WARMUP_MODES)


def initial_step(weight: torch.Tensor, groups: int, bits: int, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, z)`` of shape ``(o, groups)`` for ``weight`` (o, i) by ``how`` (module docstring), in float32 (float64
    for a float64 weight)."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32)).reshape(weight.shape[0], groups, -1)
    qn, qp = qrange(bits)
    tiny = torch.finfo(w.dtype).tiny
    zero = torch.zeros(w.shape[:2], dtype=w.dtype, device=w.device)
    if how == "lsq+":
        mean, std = w.mean(-1), w.std(-1, unbiased=False)
        scale = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs()) / (1 << (bits - 1))
    elif how == "absmax":
        scale = w.abs().amax(-1) / qp
    else:  # minmax: the extremes land on Q_n and Q_p exactly
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (high - low) / (qp - qn)
        zero = qn - low / scale.clamp(min=tiny)
    return scale.clamp(min=tiny), zero


class L4QLayer(nn.Module, BaseTunerLayer):
    """peft tuner layer computing ``x FQ(W0 + α B A)ᵀ + b`` (module docstring); one active adapter at a time."""

    adapter_layer_names = ("l4q_A", "l4q_B", "l4q_scale", "l4q_zero")
    other_param_names = ("r", "scaling", "bits", "grad_scale", "warmup", "warming")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: L4QConfig, module_name: str) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.bits: dict[str, int] = {}
        self.grad_scale: dict[str, float] = {}
        self.warmup: dict[str, tuple[int, str, str]] = {}  # (steps, mode, step_init)
        # True while warming up, False once quantizing, None until a training step says (LeanTuneCallback)
        self.warming: dict[str, Optional[bool]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerged_weight: Optional[torch.Tensor] = None
        base = self.get_base_layer()
        if resolve_quantization_backend(base) is not None or not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"L4Q cannot wrap {module_name} ({type(base).__name__}): it re-quantizes the full-precision weight "
                "W0 + αBA every step, so the base must be an unquantized nn.Linear or Conv1D. Load the base in "
                "bf16/fp32 (L4Q's training memory is LoRA's on that base), or use QLoRA on a 4-bit base."
            )
        self.in_features, self.out_features = _get_in_out_features(base)
        self.is_conv1d = isinstance(base, Conv1D)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def base_weight(self) -> torch.Tensor:
        """W0 as ``(out, in)`` (a view for Conv1D, which stores it transposed)."""
        weight = self.get_base_layer().weight
        return weight.T if self.is_conv1d else weight

    def update_layer(self, adapter_name: str, config: L4QConfig, module_name: str) -> None:
        group = config.group_size or self.in_features
        if self.in_features % group:
            raise ValueError(f"L4Q: group_size={group} does not divide the {self.in_features} inputs of "
                             f"{module_name}; choose a divisor (e.g. 32, 64, 128) or exclude the module.")
        groups = self.in_features // group
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.lora_alpha / config.r
        self.bits[adapter_name] = config.bits
        self.grad_scale[adapter_name] = (config.gradient_scale if config.gradient_scale is not None
                                         else lsq_gradient_scale(group, config.bits))
        self.warmup[adapter_name] = (config.warmup_steps, config.warmup_mode, config.step_init)
        self.warming[adapter_name] = None
        weight = self.base_weight()
        a = torch.empty(config.r, self.in_features, device=weight.device)
        b = torch.zeros(self.out_features, config.r, device=weight.device)
        if weight.device.type == "meta":  # low_cpu_mem_usage loading / `leantune plan`: values come later
            scale = zero = torch.empty(self.out_features, groups, device="meta")
        else:
            nn.init.kaiming_uniform_(a, a=5**0.5)
            if config.init_weights is False:
                nn.init.normal_(b, std=0.02)
            scale, zero = initial_step(weight.detach(), groups, config.bits, config.step_init)
        self.l4q_A[adapter_name] = nn.Parameter(a)
        self.l4q_B[adapter_name] = nn.Parameter(b)
        self.l4q_scale[adapter_name] = nn.Parameter(scale.to(weight.device))
        self.l4q_zero[adapter_name] = nn.Parameter(zero.to(weight.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def absorb_lowrank(self, adapter: str, left: torch.Tensor, right: torch.Tensor,
                       grid: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Set ``α B A = left @ right`` (B = left/α, A = right) and, if given, the grid ``(s, z)`` (LoftQ's hand-off,
        :mod:`leantune.adapters.loftq`)."""
        alpha = self.scaling[adapter]
        self.l4q_B[adapter].copy_(left / alpha)
        self.l4q_A[adapter].copy_(right)
        if grid is not None:
            self.l4q_scale[adapter].copy_(grid[0])
            self.l4q_zero[adapter].copy_(grid[1])

    @torch.no_grad()
    def before_train_step(self, step: int) -> None:
        """Warm-up (:class:`L4QConfig`): before step ``warmup_steps`` warm up; at it, initialise ``s`` and ``z`` from
        ``W0 + αBA`` and quantize from then on. A run resumed after that step keeps the checkpoint's ``s`` and ``z``;
        one resumed at it initialises them as the uninterrupted run did (``warming`` is None until a step says)."""
        for adapter, (steps, _, how) in self.warmup.items():
            if step < steps:
                self.warming[adapter] = True
                continue
            if step == steps and steps and self.warming[adapter] is not False:
                w0 = self.base_weight()
                dt = torch.promote_types(w0.dtype, torch.float32)  # W' as the quantizer forms it, one layer at a time
                w_prime = w0.to(dt) + self.scaling[adapter] * (self.l4q_B[adapter].to(dt) @ self.l4q_A[adapter].to(dt))
                scale, zero = initial_step(w_prime, self.l4q_scale[adapter].shape[1], self.bits[adapter], how)
                self.l4q_scale[adapter].copy_(scale)
                self.l4q_zero[adapter].copy_(zero)
            self.warming[adapter] = False

    def _warmup_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        base, a, b = self.get_base_layer(), self.l4q_A[adapter], self.l4q_B[adapter]
        if self.warmup[adapter][1] == "lora":
            result = base(x)
        else:  # FQ(W0) on the frozen initial grid, recomputed in backward (nothing weight-sized saved)
            scale, zero = self.l4q_scale[adapter].detach(), self.l4q_zero[adapter].detach()
            result = l4q_linear(x, self.base_weight(), a.detach(), torch.zeros_like(b), scale, zero, 1.0,
                                self.bits[adapter], self.grad_scale[adapter], base.bias)
        lora = nn.functional.linear(nn.functional.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return result + self.scaling[adapter] * lora

    # --- the served weight ------------------------------------------------------------------------------
    def quantized(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Ŵ, q, s, z)`` of ``adapter``: the served weight (o, in) in the base dtype, its int8 codes, and the step
        and zero point cast to the base dtype (what the forward multiplies by and what an export stores)."""
        w0 = self.base_weight() if self._unmerged_weight is None else self._unmerged_weight
        scale, zero = self.l4q_scale[adapter].detach(), self.l4q_zero[adapter].detach()
        # q from the parameters as they are (as the forward rounds), the dequantization in W0's dtype
        w_hat, q = served_weight(w0, self.l4q_A[adapter].detach(), self.l4q_B[adapter].detach(), scale, zero,
                                 self.scaling[adapter], self.bits[adapter], codes=True)
        return w_hat, q, scale.to(w0.dtype), zero.to(w0.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``Ŵ − W0`` in the base layer's layout (peft's API); not a low-rank matrix."""
        delta = self.quantized(adapter)[0] - self.base_weight().detach()
        return delta.T if self.is_conv1d else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # Ŵ − W0 is the rounding of W0 too, of full rank

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Replace the base weight by the served ``Ŵ`` of one adapter (the original is kept for ``unmerge``)."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.r]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged_adapters:
            raise ValueError("L4Q: only one adapter can be merged (each quantizes the base weight onto its own grid).")
        adapter = adapter_names[0]
        w_hat = self.quantized(adapter)[0]
        if safe_merge and not torch.isfinite(w_hat).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken "
                             "(merging it would put NaN/inf into the weights); nothing was merged.")
        base = self.get_base_layer()
        self._unmerged_weight = base.weight.data.clone()
        base.weight.data = (w_hat.T if self.is_conv1d else w_hat).contiguous().to(base.weight.dtype)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.get_base_layer().weight.data = self._unmerged_weight
        self._unmerged_weight = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.r]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(f"L4Q: {len(active)} adapters are active on one layer, but each quantizes the base weight "
                             "onto its own grid; activate one (model.set_adapter(name)).")
        adapter = active[0]
        if self.warming[adapter]:
            return self._warmup_forward(x, adapter)
        base = self.get_base_layer()
        return l4q_linear(x, self.base_weight(), self.l4q_A[adapter], self.l4q_B[adapter], self.l4q_scale[adapter],
                          self.l4q_zero[adapter], self.scaling[adapter], self.bits[adapter],
                          self.grad_scale[adapter], base.bias)

    def __repr__(self) -> str:
        return "l4q." + super().__repr__()


class L4QModel(LeanTuneTuner):
    """peft tuner that wraps target modules with :class:`L4QLayer`."""

    prefix = "l4q_"
    tuner_layer_cls = L4QLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def before_train_step(self, step: int) -> None:
        """Called by ``LeanTuneCallback`` before optimizer step ``step``: the warm-up switch of every layer."""
        for module in self.model.modules():
            if isinstance(module, L4QLayer):
                module.before_train_step(step)


register_tuner(LeanTuneType.L4Q, L4QConfig, L4QModel)

__all__ = ["L4QConfig", "L4QLayer", "L4QModel", "initial_step", "STEP_INITS", "WARMUP_MODES"]
