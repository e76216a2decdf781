"""Adapter files that survive faults: check before loading, undo a failed load, write atomically.

* :func:`verify_adapter_files` reads ``adapter_config.json`` and the safetensors header only, and names what is wrong:
  a truncated file (its data ends before the header says), tensors of another method than the config names, or
  tensors of a non-floating dtype where weights belong.
* :func:`load_adapter` is ``PeftModel.from_pretrained`` after that check; leantune's tuners also check shapes, dtypes
  and completeness against the model while loading (``tuner_base.check_checkpoint``). If loading fails, the adapter
  layers it injected are taken out again, so the model is left as it was, and one :class:`LeanTuneError` says why.
* :func:`atomic_output_dir` / :func:`save_adapter`: outputs are written to a temporary folder beside the target and
  renamed into place, so a process killed mid-write leaves the previous output intact (``leantune merge``,
  ``leantune export`` and :func:`save_adapter` use it; peft's own ``save_pretrained`` writes in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from leantune._utils import PEFT_PREFIX, LeanTuneError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _require_dir(path: str | os.PathLike, what: str, must_have: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise LeanTuneError(f"{what} {str(p)!r} is not a directory")
    if not (p / must_have).is_file():
        raise LeanTuneError(f"{what} {str(p)!r} has no {must_have}")
    return p


def read_adapter_config(adapter_dir: str | os.PathLike) -> PeftConfig:
    """The adapter's config (any peft or leantune type), with clear errors for wrong folders."""
    path = _require_dir(adapter_dir, "adapter directory", "adapter_config.json")
    if not (path / ADAPTER_WEIGHTS).is_file():
        bins = list(path.glob("adapter_model.bin"))
        hint = " (pickle .bin adapters are not read; re-save with safetensors)" if bins else ""
        raise LeanTuneError(f"adapter directory {str(path)!r} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        return PeftConfig.from_pretrained(str(path))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise LeanTuneError(f"{path / 'adapter_config.json'} is not a valid adapter config: {err}") from err


def read_model_config(model_dir: str | os.PathLike, what: str = "model directory"):
    """The transformers config of a model folder, with one :class:`LeanTuneError` when the folder has none or
    transformers cannot read it as a model config."""
    import transformers

    path = _require_dir(model_dir, what, "config.json")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:  # TypeError: a JSON list (transformers < 5.25)
        raise LeanTuneError(f"{path / 'config.json'} is not a model config transformers reads: "
                            f"{str(err).strip().splitlines()[0]}") from None


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, after checking the file holds all the bytes it declares."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LeanTuneError(f"{path} is truncated ({size} bytes): not a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise LeanTuneError(f"{path} is truncated: its header needs {length} bytes, the file has {size - 8}")
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LeanTuneError(f"{path} has a corrupt safetensors header ({err})") from err
    except OSError as err:
        raise LeanTuneError(f"cannot read {path}: {err.strerror or err}") from err
    if not isinstance(header, dict):
        raise LeanTuneError(f"{path} has a corrupt safetensors header (not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)):
            raise LeanTuneError(f"{path} has a corrupt safetensors header (entry {key!r})")
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + length + end > size:
        raise LeanTuneError(f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size}")
    return tensors


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """``safetensors.safe_open(path)`` after :func:`safetensors_header`'s checks; whatever safetensors still finds
    wrong with the file is one :class:`LeanTuneError` naming it (not a ``SafetensorError`` traceback)."""
    from safetensors import SafetensorError, safe_open

    safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise LeanTuneError(f"{path} is not a valid safetensors file: {str(err).splitlines()[0]}") from err


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (``safetensors.torch.load_file`` with :func:`open_safetensors`' checks)."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def verify_adapter_files(adapter_dir: str | os.PathLike) -> PeftConfig:
    """Check an adapter folder without loading it (module docstring); returns its config."""
    config = read_adapter_config(adapter_dir)
    tensors = safetensors_header(Path(adapter_dir) / ADAPTER_WEIGHTS)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    prefix = getattr(tuner, "prefix", None)
    own = [k for k in tensors if prefix and prefix in k]
    foreign = sorted({p for k in tensors for t, p in _prefixes().items() if p != prefix and f".{p}" in f".{k}"
                      and not (prefix and prefix in k)})
    if prefix and not own:
        found = f" (it holds {', '.join(foreign)} tensors)" if foreign else ""
        raise LeanTuneError(f"{Path(adapter_dir) / ADAPTER_WEIGHTS} has no {prefix} tensors, but adapter_config.json "
                            f"says {getattr(config.peft_type, 'value', config.peft_type)}{found}: the weights are from "
                            "another method or another adapter")
    integer = getattr(tuner, "integer_keys", ())
    for key in own:
        if tensors[key]["dtype"] not in _FLOAT_DTYPES and not any(name in key for name in integer):
            raise LeanTuneError(f"{key} in {Path(adapter_dir) / ADAPTER_WEIGHTS} is {tensors[key]['dtype']}, not a "
                                "floating-point weight: the file is corrupt or from another method")
    return config


def _prefixes() -> dict:
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    return dict(PEFT_TYPE_TO_PREFIX_MAPPING)


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


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise if ``out_dir`` could not be written by :func:`atomic_output_dir` (so long jobs can check first)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LeanTuneError(f"output {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LeanTuneError(f"output directory {str(out)!r} is not empty (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out_dir`` only if the block finishes without error (a process
    killed inside the block leaves ``out_dir`` as it was)."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # swap: the old folder is moved aside before the new one takes its name
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(model: PeftModel, out_dir: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(out_dir, **kwargs)``, atomically (a previous ``out_dir`` is replaced only once the
    new files are complete).

    Under FSDP2 call it on every rank: the adapter's tensors (only those, not the base model) are gathered from their
    shards and rank 0 writes the whole adapter; the other ranks wait until it is written."""
    gathered = _gather_adapter_state(model)
    if gathered is not None:
        import torch.distributed as dist

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
    from peft import get_peft_model_state_dict

    from leantune._utils import is_sharded

    state = model.state_dict()
    if not any(is_sharded(v) for v in state.values()):
        return None
    placeholders = {key: torch.empty(0) for key in state}
    owner = {id(v): key for key, v in placeholders.items()}
    kept = get_peft_model_state_dict(model, state_dict=placeholders)
    needed = {owner[id(v)] for v in kept.values() if id(v) in owner}
    return {key: (state[key].full_tensor() if is_sharded(state[key]) else state[key]) for key in sorted(needed)}


__all__ = ["ADAPTER_WEIGHTS", "LeanTuneError", "atomic_output_dir", "load_adapter", "read_adapter_config",
           "safetensors_header", "save_adapter", "strip_adapters", "verify_adapter_files"]
