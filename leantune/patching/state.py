"""The per-model patch state shared by the patch functions: what is applied where, and how to undo it."""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from leantune.architectures import hf_model


class SharingWarning(UserWarning):
    """Memory sharing between a norm and the linear after it cannot hold (the saving is lost, results stay right)."""


@dataclass
class Applied:
    """The patch on one site: its kind (None: none applies), the kinds that were tried and declined, and its undo
    closures."""

    kind: str | None
    site: Any
    declined: tuple[str, ...] = ()
    undo: list[Callable[[], None]] = field(default_factory=list)
    records: list[tuple[nn.Module, Any]] = field(default_factory=list)  # fold records (folded norms)
    count: int = 1  # modules this patch covers (VeLoRA: one per LoRA-A)


class PatchState:
    """What leantune changed in one model (stored on the transformers model as ``_leantune_patches``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.memory = None  # leantune.memory.MemoryConfig or None
        self.kernels: tuple[str, ...] = ()
        self.policy: Any = None  # the activation budget's BudgetPolicy (patching.budget), when one is on
        self.applied: dict[tuple[str, int], Applied] = {}
        self.report: list[str] = []
        self._warned: set[tuple[str, str]] = set()

    # --- helpers used by the patch functions --------------------------------------------------------------------
    def warn_once(self, key: str, reason: str, message: str) -> None:
        if (key, reason) not in self._warned:
            self._warned.add((key, reason))
            warnings.warn(message, SharingWarning, stacklevel=4)

    def note(self, line: str) -> None:
        if line not in self.report:
            self.report.append(line)

    def kinds(self, site_type: str, kind: str) -> list[Applied]:
        return [a for (t, _), a in self.applied.items() if t == site_type and a.kind == kind]

    @property
    def fold_records(self) -> list[tuple[nn.Module, Any]]:
        return [r for a in self.kinds("norm", "folded") for r in a.records]


def foreign_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward was replaced by someone else than leantune and its owner's machinery. A hub kernel
    installed by transformers' ``kernelize`` (``_kernel_repo`` beside it) is not foreign: leantune's patch replaces it
    on that module, and the module is then no longer kernelized (:func:`rebind`)."""
    return "forward" in module.__dict__ and "_kernel_repo" not in module.__dict__


_PINNED: dict[type, type] = {}


def _never_kernelize(module: nn.Module) -> bool:
    return False


def _pinned_class(cls: type) -> type:
    """A subclass of a hub-kernel layer class (one with ``kernel_layer_name``) that ``kernels.kernelize`` skips (its
    ``kernel_condition`` says no), under the same name."""
    if cls not in _PINNED:
        _PINNED[cls] = type(cls.__name__, (cls,), {"kernel_condition": staticmethod(_never_kernelize),
                                                  "_leantune_pinned": True, "__module__": cls.__module__,
                                                  "__qualname__": cls.__qualname__})
    return _PINNED[cls]


def rebind(applied: Applied, module: nn.Module, fn: Callable, name: str | None = None,
           extra: str | None = None, state: "PatchState | None" = None) -> None:
    """Bind ``fn`` as ``module``'s instance ``forward`` (and its printed name), undone by ``applied``.

    transformers (5.x, with the ``kernels`` package) re-kernelizes a model at every ``train()`` / ``eval()`` that
    changes its mode, and for a layer class with a hub kernel (``@use_kernel_forward_from_hub``, e.g. every RMSNorm)
    that pops the instance's ``forward`` — leantune's patch would vanish while its folded consumers stayed. So a
    patched module of such a class is moved to a subclass that ``kernelize`` skips (the patch owns its forward);
    undoing the patch moves it back and restores the forward it had (a hub kernel's included)."""
    saved = {attr: module.__dict__[attr] for attr in ("forward", "_get_name", "extra_repr", "_kernel_repo")
             if attr in module.__dict__}
    cls = type(module)
    pinned = hasattr(cls, "kernel_layer_name") and not getattr(cls, "_leantune_pinned", False)
    if pinned:
        module.__class__ = _pinned_class(cls)
        module.__dict__.pop("_kernel_repo", None)
        if state is not None:
            state.note(f"{cls.__name__}: hub kernels off on the modules leantune patches (their forward is leantune's)")
    module.forward = types.MethodType(fn, module)
    if name is not None:
        module._get_name = lambda: name
    if extra is not None:
        module.extra_repr = lambda: extra

    def undo() -> None:
        for attr in ("forward", "_get_name", "extra_repr"):
            module.__dict__.pop(attr, None)
        module.__dict__.update(saved)
        if pinned:
            module.__class__ = cls

    applied.undo.append(undo)


def state_of(model: nn.Module, create: bool = False) -> PatchState | None:
    target = hf_model(model)
    state = target.__dict__.get("_leantune_patches")
    if state is None and create:
        state = PatchState(model)
        target.__dict__["_leantune_patches"] = state
    return state
