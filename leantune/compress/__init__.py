"""``leantune compress``: ComPEFT compression of adapters and full fine-tuning deltas (formula: ``compeft.py``).

    compress_adapter(ADAPTER_DIR, OUT_DIR, density=0.1)   -> OUT_DIR: a loadable adapter folder (the decompressed
                                                             tensors) + ``compeft.safetensors`` (what to ship)
    decompress_adapter(COMPRESSED_DIR, OUT_DIR)           -> the loadable folder again, from compeft.safetensors
    compress_full(BASE_DIR, TUNED_DIR, OUT_DIR, ...)      -> a loadable model folder (base + compressed delta) +
                                                             ``compeft.safetensors``
    compression_info(DIR)                                 -> sizes and ratio (``leantune inspect`` prints it)
    tune_alpha(ADAPTER_DIR, OUT_DIR, score, density=0.1)  -> the paper's α chosen on validation data: one
                                                             candidate folder per α, ``score(folder)`` each, the
                                                             best one kept as OUT_DIR

``compeft.safetensors`` holds, per compressed unit, its coded positions and packed signs (uint8 tensors) and, in
its header metadata, the scale and shapes; the tensors kept exactly are stored as they are, with the reason.
Nothing is written when anything fails (the output folder appears only complete).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import save_file
from tqdm.auto import tqdm

from leantune._io import (
    ADAPTER_WEIGHTS,
    atomic_output_dir,
    check_output_dir,
    load_safetensors,
    open_safetensors,
    read_model_config,
    verify_adapter_files,
)
from leantune._utils import PEFT_PREFIX, LeanTuneError
from leantune.compress.compeft import ENCODINGS, SCOPES, concat, decode, encode, stored_bits, ternarize

COMPRESSED = "compeft.safetensors"
FORMAT = "leantune-compeft-1"
_INIT_ONE = ("ia3_l",)  # (IA)³ scales start at 1: their task vector is θ − 1
_NEEDS_BASE = ("lora_magnitude_vector",)  # DoRA: θ_init = ‖W0‖, unknown without the base weight

__all__ = ["ALPHAS", "COMPRESSED", "compress_adapter", "compress_full", "compression_info", "decompress_adapter",
           "decompress_full", "tune_alpha"]

ALPHAS: tuple[float | str, ...] = ("auto", 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)  # tune_alpha's default candidates


def _check_options(density: float, alpha: float | str, scope: str, encoding: str) -> None:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise LeanTuneError(f"density must be a fraction in (0, 1] (0.1 keeps 10%), got {density!r}")
    if alpha != "auto" and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise LeanTuneError(f"scale (alpha) must be 'auto' or a positive number, got {alpha!r}")
    if scope not in SCOPES:
        raise LeanTuneError(f"scope must be one of {SCOPES}, got {scope!r}")
    if encoding not in ENCODINGS:
        raise LeanTuneError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def _classify(config: Any, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, str]]:
    """(compressed key -> θ_init, kept key -> reason) for an adapter's tensors."""
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    prefix = getattr(tuner, "prefix", "lora_")
    trainable = set(getattr(getattr(tuner, "tuner_layer_cls", None), "adapter_layer_names", ()))
    compressed, kept = {}, {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            kept[key] = "integer tensor (seeds, shapes, indices)"
            continue
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        owner = next((p for p in parts if p.startswith(prefix)), None)
        if not key.startswith(PEFT_PREFIX):  # held by the tuner, shared by all layers (Compacter's rule)
            compressed[key] = 0.0
        elif owner is None:
            kept[key] = "modules_to_save (a new or fully trained module: no θ_init to take a task vector from)"
        elif owner in _NEEDS_BASE:
            kept[key] = "DoRA magnitude (its θ_init is a norm of the base weight)"
        elif owner in trainable:
            compressed[key] = 1.0 if owner in _INIT_ONE else 0.0
        else:
            kept[key] = "frozen adapter tensor (not trained: part of the method, not of the update)"
    return compressed, kept


def _units(keys: list[str], scope: str) -> list[tuple[str, list[str]]]:
    return [("all", keys)] if scope == "global" else [(key, [key]) for key in keys]


def _compress(tensors: dict[str, torch.Tensor], inits: dict[str, float], kept: dict[str, str], density: float,
              alpha: float | str, scope: str, encoding: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                                      dict[str, Any]]:
    """(decompressed tensors, compeft file tensors, metadata)."""
    if not inits:
        raise LeanTuneError("nothing to compress: no trainable floating-point update tensors "
                            f"(kept as they are: {sorted(kept)[:6]})")
    out_tensors: dict[str, torch.Tensor] = {}
    stored: dict[str, torch.Tensor] = {}
    units_meta = []
    for name, keys in _units(sorted(inits), scope):
        tau = concat(tensors[k].to(torch.float64) - inits[k] for k in keys)
        try:
            unit = ternarize(tau, density, alpha)
        except ValueError as err:
            raise LeanTuneError(f"{name}: {err}") from None
        coded = encode(unit, encoding, density)
        back = decode(coded, unit.numel, len(unit.positions), unit.scale)  # the stored form decodes to τ̃ exactly
        if not (torch.equal(back.positions, unit.positions) and torch.equal(back.signs, unit.signs)):
            raise LeanTuneError(f"{name}: the {encoding} code did not round-trip (a leantune bug; please report it)")
        dense = unit.dense(torch.float64)
        offset = 0
        for key in keys:
            t = tensors[key]
            piece = dense[offset:offset + t.numel()].view(t.shape)
            out_tensors[key] = (piece + inits[key]).to(t.dtype)
            offset += t.numel()
        tag = f"u{len(units_meta)}"
        stored[f"{tag}.positions"] = torch.from_numpy(np.asarray(coded["positions"]).copy())
        stored[f"{tag}.signs"] = torch.from_numpy(np.asarray(coded["signs"]).copy())
        units_meta.append({
            "tag": tag, "keys": keys, "shapes": [list(tensors[k].shape) for k in keys],
            "dtypes": [str(tensors[k].dtype).removeprefix("torch.") for k in keys], "inits": [inits[k] for k in keys],
            "numel": unit.numel, "count": len(unit.positions), "scale": unit.scale, "sigma": unit.sigma,
            "alpha": unit.alpha, "nbits": int(coded["nbits"]), "b": int(coded["b"]),
            "stored_bits": stored_bits(coded),
            "original_bytes": sum(tensors[k].numel() * tensors[k].element_size() for k in keys),
        })
    for key in sorted(kept):
        out_tensors[key] = tensors[key]
        stored[f"dense.{key}"] = tensors[key].contiguous()
    meta = {"format": FORMAT, "density": density, "alpha": alpha, "scope": scope, "encoding": encoding,
            "units": units_meta, "kept": kept}
    return out_tensors, stored, meta


def _decompress(path: Path) -> dict[str, torch.Tensor]:
    meta = _read_meta(path)
    stored = load_safetensors(path)
    out: dict[str, torch.Tensor] = {}
    for u in meta["units"]:
        coded = {"positions": stored[f"{u['tag']}.positions"].numpy(), "signs": stored[f"{u['tag']}.signs"].numpy(),
                 "nbits": u["nbits"], "b": u["b"]}
        dense = decode(coded, u["numel"], u["count"], u["scale"]).dense(torch.float64)
        offset = 0
        for key, shape, dtype, init in zip(u["keys"], u["shapes"], u["dtypes"], u["inits"]):
            n = int(np.prod(shape)) if shape else 1
            out[key] = (dense[offset:offset + n].view(shape) + init).to(getattr(torch, dtype))
            offset += n
    for key in meta["kept"]:
        out[key] = stored[f"dense.{key}"]
    return out


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> None:
    for item in src.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)


def compress_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, density: float = 0.1,
                     alpha: float | str = "auto", scope: str = "tensor", encoding: str = "golomb",
                     overwrite: bool = False) -> dict[str, Any]:
    """ComPEFT-compress a saved peft / leantune adapter (module docstring); returns :func:`compression_info`."""
    _check_options(density, alpha, scope, encoding)
    config = verify_adapter_files(adapter_dir)
    src = Path(adapter_dir)
    tensors = load_safetensors(src / ADAPTER_WEIGHTS)
    inits, kept = _classify(config, tensors)
    dense, stored, meta = _compress(tensors, inits, kept, density, alpha, scope, encoding)
    meta["method"] = str(getattr(config.peft_type, "value", config.peft_type))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _copy_other_files(src, tmp, {ADAPTER_WEIGHTS, COMPRESSED})
        save_file(dense, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        save_file(stored, str(tmp / COMPRESSED), metadata={"compeft": json.dumps(meta)})
    return compression_info(out_dir)


def _alpha_candidates(alphas: Iterable[float | str], density: float, scope: str,
                      encoding: str) -> tuple[float | str, ...]:
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
        raise LeanTuneError(f"alphas must be a non-empty sequence of positive numbers or 'auto', got {alphas!r}")
    candidates: list[float | str] = []
    for alpha in alphas:
        _check_options(density, alpha, scope, encoding)
        alpha = alpha if alpha == "auto" else float(alpha)
        if alpha in candidates:
            raise LeanTuneError(f"alphas: {alpha!r} is given twice")
        candidates.append(alpha)
    if not candidates:
        raise LeanTuneError("alphas must be a non-empty sequence of positive numbers or 'auto', got none")
    return tuple(candidates)


def _finite_score(value: Any, alpha: float | str) -> float:
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(float(number)):
        raise LeanTuneError(f"score returned {value!r} for alpha {alpha!r}; it must return a finite number")
    return float(number)


def tune_alpha(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, score: Callable[[Path], float],
               density: float = 0.1, alphas: Iterable[float | str] = ALPHAS, scope: str = "tensor",
               encoding: str = "golomb", overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """ComPEFT with its scale chosen as the paper does, per task on validation data: τ̃ = α·σ(τ)·sign(τ) on the
    kept entries for each candidate α, ``score(folder)`` (higher is better, e.g. the validation accuracy of the
    adapter loaded from ``folder``) on every candidate's compressed folder, and the best one written as ``out_dir``
    (the first candidate wins a tie). Returns :func:`compression_info` of ``out_dir`` plus ``"alpha"`` (the chosen
    candidate) and ``"scores"`` ({str(α): score}). ``out_dir`` is checked before any work and written only at the
    end: nothing is written if a candidate or ``score`` fails. Candidates live next to ``out_dir`` (one at a time
    besides the best so far).
    """
    candidates = _alpha_candidates(alphas, density, scope, encoding)
    if not callable(score):
        raise LeanTuneError(f"score must be a callable taking a folder and returning a number, got {score!r}")
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    scores: dict[str, float] = {}
    best: Path | None = None
    best_alpha: float | str = candidates[0]
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.alpha.", dir=out.parent) as tmp:
        for i, alpha in enumerate(tqdm(candidates, desc="ComPEFT α", disable=not progress)):
            folder = Path(tmp) / f"candidate{i}"
            compress_adapter(adapter_dir, folder, density=density, alpha=alpha, scope=scope, encoding=encoding)
            scores[str(alpha)] = _finite_score(score(folder), alpha)
            if best is None or scores[str(alpha)] > scores[str(best_alpha)]:
                if best is not None:
                    shutil.rmtree(best)
                best, best_alpha = folder, alpha
            else:
                shutil.rmtree(folder)
        with atomic_output_dir(out, overwrite=overwrite) as dst:
            for item in best.iterdir():
                os.replace(item, dst / item.name)
    return {**compression_info(out), "alpha": best_alpha, "scores": scores}


def decompress_adapter(compressed_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       overwrite: bool = False) -> Path:
    """Rebuild the loadable adapter folder from ``compeft.safetensors`` and ``adapter_config.json`` alone."""
    src = Path(compressed_dir)
    if not (src / COMPRESSED).is_file() or not (src / "adapter_config.json").is_file():
        raise LeanTuneError(f"{str(src)!r} needs {COMPRESSED} and adapter_config.json")
    tensors = _decompress(src / COMPRESSED)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _copy_other_files(src, tmp, {ADAPTER_WEIGHTS})
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)


def _model_tensors(model_dir: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LeanTuneError(f"{str(model_dir)!r} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_safetensors(file))
    return tensors, [f.name for f in files]


def compress_full(base_dir: str | os.PathLike, tuned_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  density: float = 0.1, alpha: float | str = "auto", scope: str = "tensor", encoding: str = "golomb",
                  overwrite: bool = False) -> dict[str, Any]:
    """ComPEFT on a full fine-tuning delta τ = tuned − base (per tensor by default). Tensors of the tuned model that
    the base lacks or shapes differently (a new head) are kept exactly. The output folder is the tuned model's, with
    its weights replaced by base + τ̃ (loadable with ``from_pretrained``), plus ``compeft.safetensors``."""
    _check_options(density, alpha, scope, encoding)
    base, tuned = Path(base_dir), Path(tuned_dir)
    read_model_config(tuned, "tuned model directory")  # the output is the tuned folder with new weights: it must load
    base_tensors, _ = _model_tensors(base)
    tuned_tensors, files = _model_tensors(tuned)
    inits, kept, deltas, base_key = {}, {}, {}, {}
    for key, value in tuned_tensors.items():
        base_key[key] = _base_key(key, base_tensors)
        ref = base_tensors.get(base_key[key]) if base_key[key] else None
        if not value.is_floating_point():
            kept[key] = "integer tensor"
        elif ref is None or ref.shape != value.shape:
            kept[key] = "not in the base model (or another shape): no task vector"
        else:
            deltas[key] = value.to(torch.float64) - ref.to(torch.float64)
            inits[key] = 0.0
    dense, stored, meta = _compress({**deltas, **{k: tuned_tensors[k] for k in kept}}, inits, kept, density, alpha,
                                    scope, encoding)
    meta["method"] = "full fine-tuning delta"
    meta["base_keys"] = {k: base_key[k] for k in inits}
    weights = {k: (base_tensors[base_key[k]].to(torch.float64) + dense[k]).to(tuned_tensors[k].dtype) if k in inits
               else dense[k] for k in tuned_tensors}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _copy_other_files(tuned, tmp, set(files) | {"model.safetensors.index.json", COMPRESSED})
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        save_file(stored, str(tmp / COMPRESSED), metadata={"compeft": json.dumps(meta)})
    return compression_info(out_dir)


def decompress_full(base_dir: str | os.PathLike, compressed_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    overwrite: bool = False) -> Path:
    """Rebuild the fine-tuned model folder from the base model and ``compeft.safetensors``."""
    src = Path(compressed_dir)
    deltas = _decompress(src / COMPRESSED)
    base_tensors, _ = _model_tensors(Path(base_dir))
    meta = _read_meta(src / COMPRESSED)
    base_keys = meta.get("base_keys", {})
    missing = sorted(k for k in base_keys.values() if k not in base_tensors)
    if missing:
        raise LeanTuneError(f"{base_dir}: not the base model of this delta (it lacks {missing[:3]})")
    weights = {k: (base_tensors[base_keys[k]].to(torch.float64) + v.to(torch.float64)).to(
        base_tensors[base_keys[k]].dtype) if k in base_keys else v for k, v in deltas.items()}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _copy_other_files(src, tmp, {"model.safetensors", COMPRESSED})
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
    return Path(out_dir)


def _base_key(key: str, base: dict[str, torch.Tensor]) -> str | None:
    """The base model's name for a tuned model's tensor: the same, or across a task wrapper's prefix ("bert.…" in
    BertForSequenceClassification against BertModel's "…", and the reverse)."""
    if key in base:
        return key
    rest = key.partition(".")[2]
    if rest in base:
        return rest
    for prefix in {k.partition(".")[0] for k in base}:
        if f"{prefix}.{key}" in base:
            return f"{prefix}.{key}"
    return None


def _read_meta(path: Path) -> dict[str, Any]:
    """The ComPEFT metadata of a compressed file, checked for the keys the readers use."""
    with open_safetensors(path) as f:
        text = (f.metadata() or {}).get("compeft", "null")
        names = set(f.keys())
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise LeanTuneError(f"{path}: its ComPEFT metadata is not JSON ({err})") from None
    units = meta.get("units") if isinstance(meta, dict) else None
    unit_keys = {"tag", "keys", "shapes", "dtypes", "inits", "numel", "count", "scale", "nbits", "b",
                 "original_bytes", "stored_bits"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not {"density", "alpha", "scope", "encoding"} <= \
            set(meta) or not isinstance(units, list) or not all(
            isinstance(u, dict) and unit_keys <= set(u) for u in units) or not isinstance(meta.get("kept"), (dict, list)) or \
            not {f"dense.{k}" for k in meta["kept"]} <= names or not all(
            {f"{u['tag']}.positions", f"{u['tag']}.signs"} <= names for u in units):
        raise LeanTuneError(f"{path}: not a leantune ComPEFT file (format {FORMAT} expected)")
    return meta


def compression_info(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Sizes of a compressed folder: original and stored bytes of the compressed tensors, kept bytes, ratios
    (None when the folder holds no ``compeft.safetensors``)."""
    path = Path(directory) / COMPRESSED
    if not path.is_file():
        return None
    meta = _read_meta(path)
    original = sum(u["original_bytes"] for u in meta["units"])
    stored = sum(u["stored_bits"] for u in meta["units"]) / 8
    with open_safetensors(path) as f:
        kept_bytes = sum(f.get_tensor(f"dense.{k}").numel() * f.get_tensor(f"dense.{k}").element_size()
                         for k in meta["kept"])
    elements = sum(u["numel"] for u in meta["units"])
    return {
        "method": meta.get("method"), "density": meta["density"], "alpha": meta["alpha"], "scope": meta["scope"],
        "encoding": meta["encoding"], "compressed_tensors": sum(len(u["keys"]) for u in meta["units"]),
        "compressed_elements": elements, "kept_elements": int(sum(u["count"] for u in meta["units"])),
        "original_bytes": original, "stored_bytes": stored,
        "ratio": original / stored if stored else float("inf"),
        "ratio_vs_fp16": elements * 2 / stored if stored else float("inf"),
        "kept_tensors": meta["kept"], "kept_bytes": kept_bytes,
        "file_bytes": path.stat().st_size,
    }
