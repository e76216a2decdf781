"""The bottom floor's file I/O: read model / adapter folders with one :class:`LeanTuneError` per problem, check a
safetensors file before anything loads it, and write outputs atomically.

* :func:`verify_adapter_files` reads ``adapter_config.json`` and the safetensors header only, and names what is wrong:
  a truncated file (its data ends before the header says), tensors of another method than the config names, or
  tensors of a non-floating dtype where weights belong.
* :func:`atomic_output_dir`: outputs are written to a temporary folder beside the target and renamed into place, so
  a process killed mid-write leaves the previous output intact (``leantune merge`` / ``export`` / ``compress`` and
  ``save_adapter`` use it; peft's own ``save_pretrained`` writes in place).
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
import transformers
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors import SafetensorError, safe_open

from leantune._utils import LeanTuneError

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
    foreign = sorted({p for k in tensors for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p != prefix and f".{p}" in f".{k}"
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


__all__ = ["ADAPTER_WEIGHTS", "atomic_output_dir", "check_output_dir", "load_safetensors", "open_safetensors",
           "read_adapter_config", "read_model_config", "safetensors_header", "verify_adapter_files"]
