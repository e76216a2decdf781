"""``leantune.memory.apply`` / ``restore``: the memory view of the one patcher, beside the kernels view
(:mod:`.kernels_view`).

Everything is per instance and reversible: norm/MLP/activation/LoRA-A ``forward`` methods are rebound on the
instance, folded linears get a forward pre-hook and their weights are rewritten (originals kept on CPU).
``handle.undo()`` reverts all of it and leaves kernels switched on by ``leantune.kernels.apply`` in place.
"""

from __future__ import annotations

import warnings

from torch import nn

from leantune.architectures import FOLDING_MODEL_TYPES, hf_model, model_type_of

from .options import MemoryConfig
from .patcher import configure
from .sites import layer_stack
from .state import SharingWarning, state_of

SUPPORTED_MODEL_TYPES = FOLDING_MODEL_TYPES

__all__ = ["MemoryHandle", "SUPPORTED_MODEL_TYPES", "SharingWarning", "apply", "enable_checkpointing", "restore"]


class MemoryHandle:
    """What :func:`apply` changed. ``undo()`` restores the model; ``report`` lists what was patched or skipped."""

    def __init__(self, model: nn.Module, config: MemoryConfig, active: bool = True, report: list[str] | None = None):
        self.model, self.config, self.active = model, config, active
        self._report = report

    @property
    def report(self) -> list[str]:
        state = state_of(self.model)
        if self._report is not None or state is None:
            return self._report or []
        return state.report

    @property
    def fold_records(self) -> list:
        state = state_of(self.model)
        return state.fold_records if state is not None and self.active else []

    @property
    def counts(self) -> dict[str, int]:
        state = state_of(self.model)
        counts = dict.fromkeys(("ms_norms", "approx_activations", "fused_gated_mlp", "velora"), 0)
        if state is None or not self.active:
            return counts
        counts["ms_norms"] = len(state.kinds("norm", "folded"))
        if self.config.approx_activations:
            counts["approx_activations"] = len(state.kinds("activation", "approx"))
        if self.config.fused_gated_mlp:
            counts["fused_gated_mlp"] = len(state.kinds("mlp", "fused"))
        counts["velora"] = sum(a.count for a in state.kinds("velora", "velora"))
        return counts

    def undo(self) -> None:
        """Revert every memory patch (weights restored bit-exactly when ``keep_original_weights``)."""
        if self.active:
            self._report = list(self.report)
            restore(self.model)
            self.active = False

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return "leantune.memory: " + counts + "".join(f"\n  - {line}" for line in self.report)


def apply(model: nn.Module, config: MemoryConfig | None = None) -> MemoryHandle:
    """Switch the memory techniques of ``config`` on for ``model`` (a transformers model, optionally peft-wrapped),
    in place; returns a :class:`MemoryHandle`.

    Unknown architectures are left untouched (a warning names the supported families). Call after adapters are
    injected (the folded norms compensate the adapters of the linears after them).
    """
    config = config or MemoryConfig()
    state = state_of(model)
    if state is not None and state.memory is not None:
        raise RuntimeError("leantune.memory.apply: this model is already patched; call leantune.memory.restore(model) "
                           "first")
    if model_type_of(model) not in SUPPORTED_MODEL_TYPES:
        target = hf_model(model)
        message = (f"leantune.memory: model type {model_type_of(model)!r} ({type(target).__name__}) is not supported; "
                   f"the model was left untouched. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        warnings.warn(message, UserWarning, stacklevel=2)
        return MemoryHandle(model, config, active=False, report=[message])
    if config.ms_norms and reentrant_checkpointing(model):
        raise ValueError("leantune.memory: the model uses reentrant gradient checkpointing, which detaches layer "
                         "inputs, so folded norms cannot recognise their own output. Enable it with "
                         "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                         "or use MemoryConfig(ms_norms=False).")
    if config.budget is not None or config.layer_modes is not None:
        _check_layer_stack(model)
    configure(model, memory=config)
    handle = MemoryHandle(model, config)
    if config.verbose:
        print(handle)
    return handle


def _check_layer_stack(model: nn.Module) -> None:
    """The activation budget works on one stack of alike layers; refuse models where it would cover only part."""
    if getattr(getattr(hf_model(model), "config", None), "is_encoder_decoder", False):
        raise ValueError(f"leantune.memory: MemoryConfig(budget=...) handles one stack of layers and "
                         f"{type(hf_model(model)).__name__} has two (encoder and decoder); use "
                         f"model.activation_checkpointing_enable() instead, or drop the budget")
    if layer_stack(model) is None:
        raise ValueError(f"leantune.memory: MemoryConfig(budget=...) found no layer list in "
                         f"{type(hf_model(model)).__name__} (model.layers, transformer.h, encoder.layer); use "
                         f"model.activation_checkpointing_enable() instead, or drop the budget")


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (the mode folded norms need), through transformers' current API
    (``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` before transformers 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether some module of ``model`` runs transformers' gradient checkpointing in reentrant mode."""
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if module.__dict__.get("gradient_checkpointing") and func is not None:
            if getattr(func, "keywords", {}).get("use_reentrant", False):
                return True
    return False


def restore(model: nn.Module) -> None:
    """Undo :func:`apply` on ``model`` (no-op if it was not patched); kernels stay as they are."""
    state = state_of(model)
    if state is not None and state.memory is not None:
        configure(model, memory=None)
