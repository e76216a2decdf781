"""Optimizer-state bytes measured from the storages the optimizer keeps alive.

Every tensor reachable from ``optimizer.state`` (nested dicts/lists included) plus the optimizer's shared tensors
(DCT bases, 8-bit quantization maps) is reduced to its untyped storage; each storage is counted once with its
full size.  So a slice that is a view of an SVD factor is charged for the whole factor, which is what really stays
in memory.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from leantune._utils import storage_bytes


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):  # e.g. galore-torch's projector objects
        yield from _tensors(vars(obj))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (per-parameter state + shared tensors), deduplicated by storage."""
    opt = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
    tensors = list(_tensors(dict(opt.state)))
    if hasattr(opt, "shared_state_tensors"):
        tensors += opt.shared_state_tensors()
    for name in ("_qmap1", "_qmap2"):
        if hasattr(opt, name):
            tensors.append(getattr(opt, name))
    return storage_bytes(tensors)
