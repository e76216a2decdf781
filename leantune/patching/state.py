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


def rebind(applied: Applied, module: nn.Module, fn: Callable, name: str | None = None,
           extra: str | None = None) -> None:
    """Bind ``fn`` as ``module``'s instance ``forward`` (and its printed name), undone by ``applied``."""
    module.forward = types.MethodType(fn, module)
    if name is not None:
        module._get_name = lambda: name
    if extra is not None:
        module.extra_repr = lambda: extra

    def undo() -> None:
        for attr in ("forward", "_get_name", "extra_repr"):
            module.__dict__.pop(attr, None)

    applied.undo.append(undo)


def state_of(model: nn.Module, create: bool = False) -> PatchState | None:
    target = hf_model(model)
    state = target.__dict__.get("_leantune_patches")
    if state is None and create:
        state = PatchState(model)
        target.__dict__["_leantune_patches"] = state
    return state
