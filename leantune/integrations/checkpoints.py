"""Adapter files that survive faults: check before loading, undo a failed load, write atomically.

* :func:`verify_adapter_files` (from :mod:`leantune._io`, the bottom floor's file I/O) reads ``adapter_config.json``
  and the safetensors header only, and names what is wrong.
* :func:`load_adapter` is ``PeftModel.from_pretrained`` after that check; leantune's tuners also check shapes, dtypes
  and completeness against the model while loading (``tuner_base.check_checkpoint``). If loading fails, the adapter
  layers it injected are taken out again, so the model is left as it was, and one :class:`LeanTuneError` says why.
* :func:`atomic_output_dir` / :func:`save_adapter`: outputs are written to a temporary folder beside the target and
  renamed into place, so a process killed mid-write leaves the previous output intact (``leantune merge``,
  ``leantune export`` and :func:`save_adapter` use it; peft's own ``save_pretrained`` writes in place).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from leantune._io import (
    ADAPTER_WEIGHTS,
    atomic_output_dir,
    check_output_dir,
    load_safetensors,
    open_safetensors,
    read_adapter_config,
    read_model_config,
    safetensors_header,
    verify_adapter_files,
)
from leantune._utils import LeanTuneError, is_sharded


def strip_adapters(model: torch.nn.Module) -> None:
    """Take injected adapter layers out of ``model`` again (each tuner layer back to its base layer)."""
    for name, module in list(model.named_modules()):
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, BaseTunerLayer) and getattr(parent, child, None) is module:
            setattr(parent, child, module.get_base_layer())
        elif isinstance(module, ModulesToSaveWrapper) and getattr(parent, child, None) is module:
            setattr(parent, child, module.original_module)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        model.__dict__.pop(attr, None)


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` that checks the files first and leaves ``model`` unchanged when it fails."""
    verify_adapter_files(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as err:
        strip_adapters(model)
        raise LeanTuneError(f"cannot load {str(adapter_dir)!r}: {str(err).splitlines()[0]}") from err


def save_adapter(model: PeftModel, out_dir: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(out_dir, **kwargs)``, atomically (a previous ``out_dir`` is replaced only once the
    new files are complete).

    Under FSDP2 call it on every rank: the adapter's tensors (only those, not the base model) are gathered from their
    shards and rank 0 writes the whole adapter; the other ranks wait until it is written."""
    gathered = _gather_adapter_state(model)
    if gathered is not None:
        if dist.get_rank() == 0:
            with atomic_output_dir(out_dir, overwrite=True) as tmp:
                model.save_pretrained(str(tmp), state_dict=gathered, **kwargs)
        dist.barrier()
        return Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), **kwargs)
    return Path(out_dir)


def _gather_adapter_state(model: PeftModel) -> dict | None:
    """The model's state dict with the adapter's FSDP2-sharded tensors gathered whole (None when nothing is sharded).

    Which entries peft saves is asked of peft itself: it filters a state dict of placeholders, and the placeholders
    it keeps name the entries to gather, so the base model's shards are never gathered."""
    state = model.state_dict()
    if not any(is_sharded(v) for v in state.values()):
        return None
    placeholders = {key: torch.empty(0) for key in state}
    owner = {id(v): key for key, v in placeholders.items()}
    kept = get_peft_model_state_dict(model, state_dict=placeholders)
    needed = {owner[id(v)] for v in kept.values() if id(v) in owner}
    return {key: (state[key].full_tensor() if is_sharded(state[key]) else state[key]) for key in sorted(needed)}


__all__ = ["ADAPTER_WEIGHTS", "LeanTuneError", "atomic_output_dir", "check_output_dir", "load_safetensors",
           "open_safetensors", "read_model_config", "load_adapter", "read_adapter_config",
           "safetensors_header", "save_adapter", "strip_adapters", "verify_adapter_files"]
