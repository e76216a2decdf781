"""Shared machinery for leantune's additive low-rank tuners (LoRA-XS, LoRA-SB, ALLoRA, DyLoRA, NOLA).

Every such method updates a frozen weight ``W0 ∈ R^{out×in}`` by a low-rank product

    W = W0 + ΔW,   ΔW = B_eff · A_eff,   B_eff ∈ R^{out×k}, A_eff ∈ R^{k×in}

where each method decides what ``B_eff`` and ``A_eff`` are (the scale is folded into them). This module
implements, once for all of them, what peft users expect from a tuner layer: wrapping ``nn.Linear``,
GPT-2's ``Conv1D`` (stored transposed) and bitsandbytes 8-bit/4-bit linears (merged through peft's
quantization backends), forward with several active adapters, ``disable_adapter``, merge / unmerge, and the
factors needed to export the adapter as a plain peft LoRA.

A method is a subclass of :class:`LowRankLayer` that adds its parameters in ``update_layer`` and overrides some
of these hooks (one contract each, like peft's ``LoraVariant``):

==================================  ==================================================================================
hook                                contract
==================================  ==================================================================================
``lowrank_factors(adapter)``        required: ``(B_eff, A_eff)`` with ``ΔW = B_eff A_eff`` (scale included), in the
                                    adapter's own parameterisation; used by merge, unmerge, ``get_delta_weight`` and
                                    export to plain LoRA.
``forward_factors(adapter)``        the ``(B_eff, A_eff)`` this forward multiplies by, or ``None`` when the method
                                    must run ``adapter_output`` (a custom backward, or factors that would make
                                    autograd save more): the fused adapter-linear kernel (``leantune.kernels``)
                                    computes ``x W0ᵀ + (x A_effᵀ) B_effᵀ`` only from non-``None`` factors.
                                    Default: ``lowrank_factors``. ALLoRA and NOLA return ``None`` in training.
``adapter_output(x, adapter)``      the training-time ``x ΔWᵀ``; its input-side product goes through
                                    :meth:`~LowRankLayer.input_linear` (or its custom function takes
                                    :meth:`~LowRankLayer.input_scale`), see below. Default: from ``forward_factors``.
``adapter_dtype(adapter)``          dtype the input is cast to (default: that of the first trainable tensor).
==================================  ==================================================================================

Input affine. ``leantune.memory`` folds a norm's ``u = γ ⊙ ŷ + β`` into the linear after it, which then reads ŷ.
It calls :meth:`~LowRankLayer.set_input_affine`; the layer keeps computing ``ΔW u`` exactly: ``input_linear``
multiplies by ``A_eff diag γ`` (formed from the weights each call and never saved, so the parameters and what is
saved do not change) and :meth:`forward` adds the parameter-only vector ``ΔW β`` (``adapter_output`` of one row
``β / γ``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from leantune._utils import compute_dtype
from leantune._validation import check_choice, check_int
from leantune.kernels.lora_linear import scaled_input_linear

from .tuner_base import LeanTuneTuner, check_module_selection, normalize_module_selection


@dataclass
class LowRankConfig(PeftConfig):
    """Fields shared by every leantune low-rank tuner (same meaning as in peft's ``LoraConfig``).

    Args:
        r: rank of the update.
        target_modules: module names (suffix match), a regex (full match), or ``"all-linear"``.
        exclude_modules: names or regex of modules never to adapt.
        layers_to_transform / layers_pattern: restrict to some layer indices, as in peft.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: peft's convention — ``True`` the method's own (paper) initialisation, identity at start where
            the method has one; ``False`` a random, non-identity initialisation meant for tests; some methods also
            take names (their ``init_weight_options``).
    """

    # peft's matching helper reads this attribute; leantune tuners adapt modules, never bare parameters.
    target_parameters: ClassVar[None] = None
    #: accepted values of ``init_weights`` (a method adds its own names)
    init_weight_options: ClassVar[tuple[Union[bool, str], ...]] = (True, False)

    r: int = field(default=8, metadata={"help": "Rank of the low-rank update."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names, a regex, or 'all-linear'."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained in full."})
    init_weights: Union[bool, str] = field(default=True, metadata={"help": "True: the method's init; False: random."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r", minimum=1)
        check_choice(self, "init_weights", self.init_weight_options)
        check_module_selection(self)
        normalize_module_selection(self)

    # ---- hooks for general code (the Trainer callback): a method that needs more overrides these -----------------
    def init_batches_needed(self) -> int:
        """How many training batches the initialisation still needs (0: ``get_peft_model`` builds it alone)."""
        return 0

    def placeholder_init(self) -> None:
        """Let ``get_peft_model`` build the layers without a data-driven initialisation (placeholders of the right
        shapes and dtypes: ``leantune plan`` on the meta device); a no-op for methods without one."""

    def inject_from_batches(self, model: nn.Module, batches: list, lr: float, loss_fn: Callable,
                            adapter_name: str = "default") -> Any:
        """``get_peft_model`` for a data-driven initialisation (only called when :meth:`init_batches_needed`)."""
        raise NotImplementedError(f"{type(self).__name__} has no data-driven initialisation")


def base_weight_out_in(layer: BaseTunerLayer) -> torch.Tensor:
    """The base weight as a float ``(out, in)`` tensor: dequantized if needed, Conv1D transposed back."""
    weight = layer.get_base_weight()
    if isinstance(layer.get_base_layer(), Conv1D):
        weight = weight.T
    return weight


class LowRankLayer(nn.Module, BaseTunerLayer):
    """peft tuner layer for additive low-rank updates; see the module docstring.

    Subclasses set ``adapter_layer_names`` (trainable containers) and ``other_param_names`` (frozen
    containers and plain per-adapter dicts), create those containers after calling this ``__init__``,
    then call their own ``update_layer``.
    """

    supported_base_types: ClassVar[tuple[type, ...]] = (nn.Linear, Conv1D)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.quantization_backend = resolve_quantization_backend(base)
        if self.quantization_backend is None and not isinstance(base, self.supported_base_types):
            raise TypeError(
                f"{type(self).__name__} cannot wrap a {type(base).__name__}: supported are nn.Linear, "
                "transformers Conv1D and bitsandbytes Linear8bitLt/Linear4bit. Remove it from `target_modules`."
            )
        self.in_features, self.out_features = _get_in_out_features(base)
        self.is_conv1d = isinstance(base, Conv1D)
        self.input_affine: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # (γ, β) of a folded norm

    # --- what a method defines -------------------------------------------------------------------------
    def lowrank_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_eff (out×k), A_eff (k×in))`` with ``ΔW = B_eff @ A_eff`` (scale included)."""
        raise NotImplementedError

    def forward_factors(self, adapter: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(B_eff, A_eff)`` this forward uses, or ``None`` if it is not a plain product (custom backward).

        The fused adapter-linear kernel (``leantune.kernels``) computes ``x W0ᵀ + (x A_effᵀ) B_effᵀ`` from them.
        """
        return self.lowrank_factors(adapter)

    def adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's additive contribution ``x ΔWᵀ`` for input ``x`` (…, in)."""
        b_eff, a_eff = self.forward_factors(adapter)
        return nn.functional.linear(self.input_linear(x, a_eff), b_eff)

    # --- input affine of a folded norm (set by leantune.memory; see the module docstring) ----------------------
    def set_input_affine(self, gamma: torch.Tensor, beta: Optional[torch.Tensor]) -> None:
        """From now on the input is ŷ with ``u = γ ⊙ ŷ + β``: keep computing ``ΔW u`` (``beta`` None: β = 0).
        ``gamma``/``beta`` are the norm's own frozen tensors, read at every call."""
        self.input_affine = (gamma, beta)

    def clear_input_affine(self) -> None:
        self.input_affine = None

    def input_scale(self) -> Optional[torch.Tensor]:
        """γ while an input affine is set (the norm's own weight, or Gemma's ``1 + w`` buffer), else None."""
        return None if self.input_affine is None else self.input_affine[0]

    def input_linear(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x (A diag γ)ᵀ`` while an input affine is set (the product is never saved), else ``x Aᵀ``."""
        return scaled_input_linear(x, a, self.input_scale())

    def adapter_dtype(self, adapter: str) -> torch.dtype:
        """dtype the input is cast to before the adapter path (that of its first trainable tensor)."""
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter in container:
                return container[adapter].dtype
        raise KeyError(adapter)

    # --- peft behaviour shared by all low-rank methods ---------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` in the base layer's own layout (``(in, out)`` for Conv1D), as peft expects."""
        b_eff, a_eff = self.lowrank_factors(adapter)
        delta = b_eff @ a_eff
        return delta.T if self.is_conv1d else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``ΔW`` of the given (default: active) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
            raise ValueError(f"Merging into {type(self.get_base_layer()).__name__} weights is not supported.")
        for adapter in adapter_names:
            if adapter not in self.r:
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(adapter).detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken "
                                 "(merging it would put NaN/inf into the weights); nothing was merged.")
            self.set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again (in reverse order)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_weight()
            self.set_base_weight(weight - self.get_delta_weight(adapter).detach().to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        shift = None
        if self.input_affine is not None and self.input_affine[1] is not None:
            gamma, beta = self.input_affine
            shift = beta.to(compute_dtype(beta.dtype)) / gamma.to(compute_dtype(beta.dtype))
        for adapter in self.active_adapters:
            if adapter not in self.r:
                continue
            dtype = self.adapter_dtype(adapter)
            x_cast = self._cast_input_dtype(x, dtype)
            result = result + self.adapter_output(x_cast, adapter).to(result.dtype)
            if shift is not None:  # ΔW β of a folded norm's bias: one row β / γ through the same computation
                result = result + self.adapter_output(shift.to(dtype)[None], adapter).to(result.dtype)
        return result

    def absorb_lowrank(self, adapter: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """Set the adapter so that ``ΔW = left @ right`` (out×k, k×in; LoftQ's initialisation,
        :mod:`leantune.adapters.loftq`); a method whose update cannot hold a given rank-k matrix raises."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot start from a given low-rank update (LoftQ initialisation): its ΔW is not a "
            "free product of two factors. Use peft LoRA, ALLoRA, DyLoRA, LoRA-XS or LoRA-SB.")

    def factor_pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(adapter, B, A)`` of trainable factors with ΔW ∝ B A that may be refactorized (restarts); most methods
        have fixed or structured factors and return none."""
        return []

    def __repr__(self) -> str:
        return f"{self.__class__.__name__.lower()}.{super().__repr__()}"


class LowRankModel(LeanTuneTuner):
    """peft tuner for a :class:`LowRankLayer` subclass (set ``prefix`` and ``tuner_layer_cls``)."""

    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def before_train_step(self, step: int) -> None:
        """Called by ``LeanTuneCallback`` before optimizer step ``step`` (0-based, resumed runs included); a method
        whose training draws per step (DyLoRA's ranks) reseeds here so a resumed run draws the same."""

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        super()._check_new_adapter_config(config)
        if getattr(config, "bias", "none") != "none":
            raise ValueError(f"{type(self).__name__} does not train biases; set bias='none'.")
