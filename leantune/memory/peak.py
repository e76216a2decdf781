"""Peak tensor memory of a piece of code on any device (the CPU has no allocator statistics).

``peak_bytes(fn)`` runs ``fn`` under a ``TorchDispatchMode`` that sees every tensor an op creates: each new storage
is added to the live total, and taken off again when the last tensor using it dies (a finalizer per tensor, a
reference count per storage). Tensors that existed before (parameters, gradients, optimizer state) are passed in as
``baseline`` and counted as live throughout. On CUDA ``torch.cuda.max_memory_allocated`` measures the same thing
(plus allocator rounding); this counter is what ``leantune plan`` is validated against on the CPU.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from leantune._utils import storage_bytes


class _LiveTensors(TorchDispatchMode):
    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.known = known  # storages that existed before: counted in the baseline

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.known:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_bytes(fn: Callable[[], Any], baseline: Iterable[torch.Tensor] = ()) -> int:
    """Largest total of live tensor bytes while ``fn()`` runs: ``baseline`` (deduplicated by storage) plus the
    tensors ``fn`` creates, freed as they die."""
    baseline = [t for t in baseline if isinstance(t, torch.Tensor)]
    known = {t.untyped_storage()._cdata for t in baseline}
    mode = _LiveTensors(known)
    with mode:
        fn()
    return storage_bytes(baseline) + mode.peak
