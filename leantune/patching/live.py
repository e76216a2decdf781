"""Which storages a forward leaves alive, and what each op of it costs — the two measurements the budget policy's
cost model (:mod:`.budget`) is made of.

:class:`LiveStorages` is a ``TorchDispatchMode``: it keeps a handle on the storage of every tensor an op creates, and
after the forward (outputs dropped) counts the storages someone else still references
(``torch._C._storage_Use_Count > 1``). That is what the step holds for backward however it is held — autograd's
saved tensors, the inputs a checkpoint frame keeps, a selective-checkpoint cache, tensors on ``ctx`` attributes —
where ``saved_tensors_hooks`` see only the first (and the frames' inputs). It works on ``meta`` (the planner) as on
real devices. Parameters and buffers are not created by the forward and so not counted.

It also records every op with its FLOPs (``torch.utils.flop_counter``'s formulas) and the bytes it reads and
writes, tagged with the region (:func:`region`) it ran in.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

_REGION = threading.local()
# one handle per storage however many counters watch it (nested counters: the planner's trace around the policy's
# probe), so "referenced elsewhere" is always use count > 1: [storage, number of counters watching]
_HANDLES: dict[int, list[Any]] = {}


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """Tag the ops run inside with ``name`` (read by :func:`current_region`; nested: innermost wins)."""
    previous = getattr(_REGION, "name", None)
    _REGION.name = name
    try:
        yield
    finally:
        _REGION.name = previous


def current_region() -> str | None:
    return getattr(_REGION, "name", None)


@dataclass
class OpRecord:
    """One op of a forward: its overload, FLOPs, bytes read + written, output bytes and region."""

    op: Any
    flops: int
    bytes_moved: int
    out_bytes: int
    region: str | None
    shapes: tuple = ()  # of the positional arguments (None for non-tensors)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LiveStorages(TorchDispatchMode):
    """``with LiveStorages(device) as live: out = fn(); del out`` then ``live.bytes()``: the bytes of the storages on
    ``device`` (a type, "cpu"/"cuda"/"meta"; None: any) created inside and still referenced elsewhere."""

    def __init__(self, device: str | None = None, record_ops: bool = False) -> None:
        super().__init__()
        self.device = device
        self.record_ops = record_ops
        self.ops: list[OpRecord] = []
        self._keys: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = _tensors(out)
        # views and in-place results share an input's storage: not made here (a parameter's .t(), for one)
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in outputs:
            if self.device is None or t.device.type == self.device:
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._keys and key not in inputs:
                    self._keys.add(key)
                    entry = _HANDLES.setdefault(key, [storage, 0])
                    entry[1] += 1
        if self.record_ops:
            self.ops.append(self._record(func, args, kwargs or {}, out, outputs))
        return out

    @staticmethod
    def _record(func, args, kwargs, out, outputs) -> OpRecord:
        inputs = _tensors((args, kwargs))
        flops = 0
        packet = func._overloadpacket
        if packet in flop_registry:
            try:
                flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
            except Exception:  # a formula that does not take this overload's arguments: count no FLOPs
                flops = 0
        written = sum(_nbytes(t) for t in outputs)
        is_view = bool(outputs) and all(t._is_view() for t in outputs)
        moved = 0 if is_view else written + sum(_nbytes(t) for t in inputs)
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        return OpRecord(func, flops, moved, 0 if is_view else written, current_region(), shapes)

    def bytes(self, exclude: Any = ()) -> int:
        """Bytes of the storages created inside that something still references (call after dropping what you hold
        yourself, or name it in ``exclude``: tensors whose storages are not counted)."""
        skip = {t.untyped_storage()._cdata for t in _tensors(exclude)}
        return sum(_HANDLES[key][0].nbytes() for key in self._keys - skip if torch._C._storage_Use_Count(key) > 1)

    def release(self) -> None:
        """Drop the handles (the storages can then be freed)."""
        for key in self._keys:
            entry = _HANDLES[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HANDLES[key]
        self._keys.clear()


def held_for_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes one forward ``model(**batch)`` leaves alive for backward on the model's device, the loss (or output)
    itself excluded; the graph is dropped afterwards (no backward runs)."""
    device = next((p.device.type for p in model.parameters()), "cpu")
    live = LiveStorages(device)
    try:
        with live:
            out = model(**batch)
        loss = getattr(out, "loss", None)
        del out
        return live.bytes(exclude=loss)
    finally:
        live.release()
