"""Turn leantune adapters into what serving tools understand: merged full models and plain peft LoRA.

These are the functions behind ``leantune merge``, ``leantune export`` and ``leantune inspect``; a
notebook user calls them directly. Every writer builds its output in a temporary folder next to the
destination and renames it into place at the end, so a failure (or a killed process) never leaves a half-written
directory; every reader checks the adapter files first (:mod:`.checkpoints`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import leantune.adapters  # noqa: F401  (registers the tuner types)
from leantune import _notices
from leantune._io import (
    ADAPTER_WEIGHTS,
    atomic_output_dir,
    open_safetensors,
    read_model_config,
    safetensors_header,
    verify_adapter_files,
)
from leantune._utils import PEFT_PREFIX, LeanTuneError
from leantune.adapters.low_rank import LowRankLayer
from leantune.compress import compression_info
from leantune.integrations.checkpoints import load_adapter

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
)
# peft records no model class for task-typed adapters; these are the classes its task types wrap
TASK_TYPE_TO_AUTO_CLASS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def load_base_model(
    base_dir: str | os.PathLike, model_class: Optional[str] = None, num_labels: Optional[int] = None
) -> torch.nn.Module:
    """Load a Hugging Face model folder offline.

    The class is ``model_class`` (e.g. the ``BertForSequenceClassification`` an adapter was trained on),
    else the first of ``config.json``'s ``architectures``, else ``AutoModel``.
    """
    config = read_model_config(base_dir, "base model directory")
    path = Path(base_dir)
    for weights in sorted(path.glob("*.safetensors")):  # a truncated or corrupt file: named before transformers reads it
        safetensors_header(weights)
    name = model_class or next(iter(getattr(config, "architectures", None) or []), None)
    model_cls = getattr(transformers, name, None) if name else None
    model_cls = model_cls or transformers.AutoModel
    kwargs = {"num_labels": num_labels} if num_labels else {}
    try:
        with _quiet_transformers():
            model = model_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise LeanTuneError(f"cannot load the base model from {str(path)!r}: {str(err).splitlines()[0]}") from err
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the expected "newly initialized head" report: the adapter's saved head replaces it."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _saved_head_labels(adapter_dir: Path, model: torch.nn.Module) -> Optional[int]:
    """Number of labels of a saved classification head whose size differs from the freshly built one."""
    prefix = PEFT_PREFIX
    own = model.state_dict()
    with open_safetensors(adapter_dir / ADAPTER_WEIGHTS) as f:
        for key in f.keys():
            name = key.removeprefix(prefix)
            if name.endswith(".weight") and name in own and own[name].dim() == 2:
                saved = f.get_slice(key).get_shape()
                if saved[0] != own[name].shape[0] and saved[1] == own[name].shape[1]:
                    return int(saved[0])
    return None


def load_adapted_model(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> PeftModel:
    """Base model + adapter, built as the class the adapter was trained on; errors become one-liners (the adapter's
    files are checked before the base is loaded)."""
    config = verify_adapter_files(adapter_dir)
    task = str(getattr(config.task_type, "value", config.task_type)) if config.task_type else None
    model_class = (config.auto_mapping or {}).get("base_model_class") or TASK_TYPE_TO_AUTO_CLASS.get(task)
    base = load_base_model(base_dir, model_class)
    labels = _saved_head_labels(Path(adapter_dir), base) if getattr(base.config, "num_labels", None) else None
    if labels:
        base = load_base_model(base_dir, model_class, num_labels=labels)
    return load_adapter(base, adapter_dir).eval()


# --- writing ---------------------------------------------------------------------------------------------
def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files a model folder may hold; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def merge_to_directory(
    base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a full Hugging Face model folder with the adapter merged into the weights.

    The result loads with ``AutoModel*.from_pretrained(out_dir)`` and gives the adapted model's outputs.
    Non-mergeable adapters (e.g. bottleneck adapters) raise a :class:`LeanTuneError` saying so.
    """
    model = load_adapted_model(base_dir, adapter_dir)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        try:
            merged = model.merge_and_unload(progressbar=_notices.progress_bars)
        except (ValueError, TypeError, NotImplementedError) as err:
            raise LeanTuneError(f"cannot merge this adapter: {str(err).splitlines()[0]}") from err
        merged.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(Path(base_dir), tmp)
    return Path(out_dir)


@dataclass
class LoraFactors:
    """What a plain LoRA adapter needs per module: ``ΔW = lora_B @ lora_A`` with scale 1."""

    lora_a: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_b: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_in_fan_out: bool = False


def lowrank_factors_of(model: PeftModel, adapter_name: str = "default") -> LoraFactors:
    """Collect ``(A_eff, B_eff)`` of every adapted module; raises if a layer is not additive low-rank.

    leantune's low-rank layers give their own factors; peft LoRA layers (vanilla, no ``lora_bias``) give
    ``(A, s · B)``, so a LoRA adapter exports to itself.
    """
    factors = LoraFactors()
    for name, module in tqdm(list(model.named_modules()), desc="Collecting low-rank factors", leave=False,
                             disable=not _notices.progress_bars):
        key = name.removeprefix(PEFT_PREFIX)
        if isinstance(module, LowRankLayer):
            if adapter_name not in module.r:
                continue
            with torch.no_grad():
                b_eff, a_eff = module.lowrank_factors(adapter_name)
            factors.fan_in_fan_out = module.is_conv1d
        elif isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
            if adapter_name in getattr(module, "lora_variant", {}) or module.lora_B[adapter_name].bias is not None:
                raise LeanTuneError(f"module {key!r} uses a LoRA variant or lora_bias, which a plain LoRA adapter "
                                    "cannot express; use `leantune merge` to get plain weights instead")
            a_eff = module.lora_A[adapter_name].weight
            b_eff = module.lora_B[adapter_name].weight * module.scaling[adapter_name]
            factors.fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
        elif hasattr(module, "base_layer") and not isinstance(module, ModulesToSaveWrapper):
            method = model.peft_config[adapter_name].peft_type
            raise LeanTuneError(
                f"{method} is not an additive low-rank method (module {key!r}), so it has no exact LoRA form; use "
                "`leantune merge` to get plain weights instead"
            )
        else:
            continue
        factors.lora_a[key] = a_eff.detach().float().contiguous().clone()
        factors.lora_b[key] = b_eff.detach().float().contiguous().clone()
    if not factors.lora_a:
        raise LeanTuneError("the adapter has no low-rank layers to export")
    return factors


def export_to_lora(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_dir: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
) -> Path:
    """Rewrite any leantune low-rank adapter as a plain peft LoRA adapter with equal outputs.

    Each module gets ``lora_A = A_eff``, ``lora_B = B_eff`` at its own rank with ``lora_alpha = r``
    (scale 1), so ``ΔW`` is bit-for-bit the product leantune computes. ``modules_to_save`` (e.g. a
    classifier head) are carried over. The base model is needed for methods whose factors depend on
    it; it defaults to the adapter's recorded ``base_model_name_or_path``.
    """
    config = verify_adapter_files(adapter_dir)
    base_dir = base_dir or config.base_model_name_or_path
    if not base_dir:
        raise LeanTuneError("the adapter does not record its base model; pass --base MODEL_DIR")
    model = load_adapted_model(base_dir, adapter_dir)
    factors = lowrank_factors_of(model)
    saved_heads = {
        name.removeprefix(PEFT_PREFIX): {k: v.clone() for k, v in m.modules_to_save["default"].state_dict().items()}
        for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)
    }
    base = model.unload()
    ranks = {name: a.shape[0] for name, a in factors.lora_a.items()}
    r = max(ranks.values())
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern={f"^{k}$": v for k, v in ranks.items() if v != r},
        alpha_pattern={f"^{k}$": v for k, v in ranks.items() if v != r},
        target_modules=sorted(ranks),
        fan_in_fan_out=factors.fan_in_fan_out,
        lora_dropout=0.0,
        modules_to_save=sorted(saved_heads) or None,
        task_type=config.task_type,
        base_model_name_or_path=str(base_dir),
        init_lora_weights=False,
    )
    lora_model = get_peft_model(base, lora_config)
    with torch.no_grad():
        for name in ranks:
            layer = lora_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(factors.lora_a[name])
            layer.lora_B["default"].weight.copy_(factors.lora_b[name])
            if layer.scaling["default"] != 1.0:
                raise LeanTuneError(f"internal error: exported scale for {name} is {layer.scaling['default']}")
        for name, state in saved_heads.items():
            wrapper = lora_model.base_model.model.get_submodule(name)
            wrapper.modules_to_save["default"].load_state_dict(state)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        lora_model.save_pretrained(tmp)
    return Path(out_dir)


# --- inspecting ------------------------------------------------------------------------------------------
def inspect_adapter(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Method, targets, ranks, trainable parameter count and base model of a saved adapter (no model load)."""
    config = verify_adapter_files(adapter_dir)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    prefix = getattr(tuner, "prefix", "lora_")
    trainable_names = set(getattr(getattr(tuner, "tuner_layer_cls", None), "adapter_layer_names", ()))
    trainable = frozen = head = 0
    modules: set[str] = set()
    with open_safetensors(Path(adapter_dir) / ADAPTER_WEIGHTS) as f:
        for key in f.keys():
            numel = 1
            for dim in f.get_slice(key).get_shape():
                numel *= dim
            if not key.startswith(PEFT_PREFIX):  # held by the tuner, shared by all layers (Compacter's rule)
                trainable += numel
                continue
            parts = key.removeprefix(PEFT_PREFIX).split(".")
            owner = next((i for i, p in enumerate(parts) if p.startswith(prefix)), None)
            if owner is None:  # a fully trained module (modules_to_save), e.g. a classifier head
                head += numel
                continue
            modules.add(".".join(parts[:owner]))
            if parts[owner] in trainable_names:
                trainable += numel
            else:
                frozen += numel
    return {
        "method": str(getattr(config.peft_type, "value", config.peft_type)),
        "base_model": config.base_model_name_or_path,
        "task_type": str(getattr(config.task_type, "value", config.task_type)) if config.task_type else None,
        "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, (set, list))
        else config.target_modules,
        "adapted_modules": len(modules),
        "rank": getattr(config, "r", None),
        "trainable_adapter_parameters": trainable,
        "frozen_adapter_parameters": frozen,
        "modules_to_save_parameters": head,
        "config": {k: v for k, v in config.to_dict().items() if v not in (None, {}, [], "")},
        "compression": _compression(adapter_dir),
    }


def _compression(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    return compression_info(adapter_dir)
