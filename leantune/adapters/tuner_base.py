"""What every leantune tuner shares, whatever its layers: module selection checks, wrapping, safe loading."""

from __future__ import annotations

from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from leantune._utils import PEFT_PREFIX
from leantune._validation import check_layers, check_names


def check_module_selection(config: PeftConfig) -> None:
    """Types of the module-selection fields every leantune config shares (names the field on a bad value)."""
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        check_names(config, name)
    check_layers(config, "layers_to_transform")
    if config.modules_to_save is not None and not isinstance(config.modules_to_save, (list, tuple, set)):
        raise ValueError(f"{type(config).__name__}.modules_to_save must be a list of module names or None, got "
                         f"{config.modules_to_save!r}.")
    check_names(config, "modules_to_save", regex_items=True)


def normalize_module_selection(config: PeftConfig) -> None:
    """peft's conventions for ``target_modules`` / ``exclude_modules`` / ``layers_pattern`` (in ``__post_init__``)."""
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("`layers_pattern` only makes sense together with `layers_to_transform`.")


def check_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, adapter_name: str,
                     any_dtype: tuple[str, ...] = ()) -> None:
    """Raise a ``ValueError`` naming the first adapter tensor that cannot be loaded as it is.

    * a shape that differs from the model's (the adapter was trained on a different base model);
    * a floating-point tensor where the model holds an integer one, or the reverse (a corrupt or foreign file);
    * an adapter tensor the checkpoint lacks (the file is from another method or incomplete) — peft would leave it at
      its initial value and load "successfully".

    torch's own error would list every mismatch of every layer at once, and peft ignores missing adapter keys.
    """
    own = model.state_dict()
    if not any(k.startswith(PEFT_PREFIX) for k in own):
        state_dict = {k.removeprefix(PEFT_PREFIX): v for k, v in state_dict.items()}
    for key, target in own.items():  # model order, so "first" means the earliest layer
        tensor = state_dict.get(key)
        if tensor is None:
            if prefix in key and f".{adapter_name}" in f".{key}." and ".base_layer." not in key:
                raise ValueError(f"The checkpoint has no {key.removeprefix(PEFT_PREFIX)!r}: it is from another method "
                                 "or another adapter, or it is incomplete.")
            continue
        if target.shape != tensor.shape:
            raise ValueError(
                f"This adapter was trained on a different base model: for {key.removeprefix(PEFT_PREFIX)!r} the "
                f"checkpoint has shape {tuple(tensor.shape)} but this model needs {tuple(target.shape)}. "
                "Load it onto the base model it was trained with."
            )
        if target.is_floating_point() != tensor.is_floating_point() and not any(k in key for k in any_dtype):
            raise ValueError(f"The checkpoint's {key.removeprefix(PEFT_PREFIX)!r} is {tensor.dtype} where this model "
                             f"holds {target.dtype}: the file is corrupt or from another method.")


class LeanTuneTuner(BaseTuner):
    """A peft ``BaseTuner`` that wraps each target with ``tuner_layer_cls`` and checks shapes on load.

    Subclasses set ``prefix`` and ``tuner_layer_cls``; override :meth:`new_layer` to pass extra state.
    """

    #: checkpoint entries whose dtype may differ from the model's (the layer checks them itself, e.g. NOLA's
    #: fingerprint, int32 now and float in older saves)
    any_dtype_keys: tuple[str, ...] = ()
    #: checkpoint entries that are integers by design (everything else of the method must be floating point)
    integer_keys: tuple[str, ...] = ()

    def new_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, module_name: str) -> nn.Module:
        """The tuner layer wrapping ``target`` (called once per target module)."""
        return self.tuner_layer_cls(target, adapter_name, config, module_name)

    def _create_and_replace(
        self,
        config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, current_key)
            return
        new_module = self.new_layer(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_checkpoint(model, remapped, cls.prefix, adapter_name, cls.any_dtype_keys)
        return remapped
