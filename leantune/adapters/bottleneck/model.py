"""peft tuner for the bottleneck-adapter family (Houlsby, Pfeiffer, PHM adapters, Compacter, Compacter++).

The tuner owns the state shared across layers: for every adapter name with ``phm=True`` and
``shared_phm_rule=True``, one rule tensor ``S ∈ R^{n×n×n}`` (Compacter's "slow" weights) in
``bottleneck_phm_rule``, initialised N(0, phm_init_range). It is one ``nn.Parameter``: every PHM layer
of that adapter reads it, it appears once in ``parameters()`` and once in the saved adapter. With
``unfreeze_layer_norms`` the base model's LayerNorm/RMSNorm modules are added to ``modules_to_save``, so
they train and are saved with (and disabled with) the adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.config import PeftConfig
from torch import nn

from ..registration import LeanTuneType, register_tuner
from ..tuner_base import LeanTuneTuner
from .config import BottleneckConfig, CompacterConfig
from .layer import MERGE_REFUSAL, BottleneckLayer, SharedRules
from .placement import placement_regex


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm-like: ``nn.LayerNorm`` or a class named ``*LayerNorm`` / ``*RMSNorm`` (T5, Llama, ...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def norm_layer_names(model: nn.Module) -> list[str]:
    """Full names of the base model's norm layers (skipping peft's wrapper copies)."""
    return [
        name
        for name, module in model.named_modules()
        if name and is_norm_layer(module) and ".modules_to_save." not in name and ".original_module" not in name
    ]


class BottleneckModel(LeanTuneTuner):
    """peft tuner wrapping sublayer-output projections with :class:`BottleneckLayer`."""

    prefix = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict = {}  # placement comes from .placement, see _prepare_adapter_config
    uses_shared_state = True

    def _shared_rules(self) -> nn.ParameterDict:
        if "bottleneck_phm_rule" not in self._modules:
            self.bottleneck_phm_rule = nn.ParameterDict({})
        return self.bottleneck_phm_rule

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # peft calls this both from __init__ and from PeftModel.add_adapter (which skips the injection hooks),
        # so the shared state of a new adapter is created here
        config: BottleneckConfig = self.peft_config[adapter_name]
        rules = self._shared_rules()
        if config.phm and config.shared_phm_rule and adapter_name not in rules:
            n = config.phm_dim
            device = next(model.parameters()).device
            rules[adapter_name] = nn.Parameter(torch.randn(n, n, n, device=device) * config.phm_init_range)
        if config.unfreeze_layer_norms:
            names = list(config.modules_to_save or [])
            config.modules_to_save = names + [n for n in norm_layer_names(model) if n not in names]
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if adapter_name in rules:
            trainable = adapter_name in self.active_adapters and not config.inference_mode
            rules[adapter_name].requires_grad_(trainable)

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = placement_regex(model_config.get("model_type"), peft_config.placement)
        return peft_config

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, BottleneckConfig):
            raise TypeError(f"BottleneckModel needs a BottleneckConfig, got {type(config).__name__}.")

    def new_layer(self, target: nn.Module, adapter_name: str, config: BottleneckConfig, module_name: str) -> nn.Module:
        return BottleneckLayer(target, adapter_name, config, module_name, SharedRules(self._shared_rules()))

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_REFUSAL)  # before merge_and_unload touches any module

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for name, rule in self._shared_rules().items():
            rule.requires_grad_(name in active and not inference_mode)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``X.bottleneck_adapter.<name>.down.weight`` → ``X.bottleneck_adapter.down.weight``: the adapter name sits
        third from the end in this method's keys, where peft's rule does not look, so a checkpoint loads under any
        adapter name."""
        marker = f".bottleneck_adapter.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".bottleneck_adapter.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # checkpoints written before the rule above kept the saved adapter name: drop it
        legacy = {}
        for key, value in state_dict.items():
            head, sep, tail = key.partition(".bottleneck_adapter.")
            parts = tail.split(".")
            if sep and len(parts) > 2 and parts[1] in ("down", "up"):
                key = f"{head}.bottleneck_adapter.{'.'.join(parts[1:])}"
            legacy[key] = value
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, legacy)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft casts the adapter layers; the shared PHM rule lives on the tuner and follows the same rule: fp32 for a
        16-bit model under ``autocast_adapter_dtype``, else the dtype of the layers' base weights."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        rules = self._shared_rules()
        layer = next((m for m in self.model.modules() if isinstance(m, BottleneckLayer)), None)
        if adapter_name not in rules or layer is None:
            return
        base_dtype = layer.get_base_layer().weight.dtype
        low = base_dtype in (torch.float16, torch.bfloat16)
        target = torch.float32 if (autocast_adapter_dtype and low) else base_dtype
        if rules[adapter_name].dtype != target:
            rules[adapter_name].data = rules[adapter_name].data.to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        rules = self._shared_rules()
        if adapter_name in rules:
            del rules[adapter_name]


register_tuner(LeanTuneType.BOTTLENECK, BottleneckConfig, BottleneckModel, variants={"compacter": CompacterConfig})
