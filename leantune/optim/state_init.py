"""The state of an optimizer that has not stepped yet, as ``torch.distributed.checkpoint`` asks for it.

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (what accelerate calls to save and load FSDP2
checkpoints) need the state to exist before they can save it or load into it. On an optimizer without state they call
``step()`` once with every gradient set to zero and every learning rate set to 0 (torch's ``_init_optim_state``).
For a low-rank optimizer a real first step refreshes every projector. Under FSDP2 that means an all-gather of every
sharded gradient, i.e. of the whole model on every rank, and an SVD of each matrix. That is minutes for a 7B model,
for a state the load overwrites at once.

That step is recognised here (:func:`is_init_step`: no state, lr 0 in every group, every gradient zero, on every rank:
one pass over the local gradients and a one-byte all-reduce) and runs shape-only (:func:`write_stand_in`). Each
projector writes a stand-in basis, the first rows or columns of the identity, with the shape, dtype and memory layout
its refresh would write: no all-gather of the gradient, no decomposition, no random draw, so the global RNG is
unchanged (the layout comes from a 3 × 2 SVD, once per device type). The layout matters: a loaded state is put back
in the layout the state has (``checkpoint.py``), and CPU GEMMs round by layout. The update rule then creates the
moments with their shapes; with lr 0 and a zero gradient the weights do not change.

The optimizer then holds a stand-in state (``LowRankOptimizer.stand_in``, set before the first parameter's, so an
error halfway leaves it set). A load replaces it. A real step that finds it still there drops it first, so training
on after saving an unstepped optimizer is the training without that save. (The mark is not saved: resuming from a
checkpoint of a never-stepped optimizer starts from the stand-in bases until the first refresh.)
Projector kinds with more state than a basis (Q-GaLore's lazy INT4 projector) take the real refresh.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from leantune.optim.dct import DCTProjector
from leantune.optim.projectors import (
    Projector,
    RandomizedSVDProjector,
    RandomProjector,
    SVDProjector,
    TwoSidedSVDProjector,
)
from leantune.optim.sharded import ShardedProjector, all_ranks_true, local, row_shard
from leantune.optim.svd import thin_svd


def is_init_step(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> bool:
    """Whether this ``step()`` is ``_init_optim_state``'s: no state yet, lr 0 in every group and every gradient
    (``grads``, this rank's) zero on every rank. A first step under a warm-up schedule (lr 0) has a non-zero gradient
    somewhere, so it steps for real. With offloaded state (``offload.py``, never under FSDP2) the step is real."""
    if optimizer.state or not grads or getattr(optimizer, "offload", None) is not None:
        return False
    if any(float(g.get("lr", 0.0)) != 0.0 for g in optimizer.param_groups):
        return False
    # on the gradients' device: an NCCL group reduces CUDA tensors only
    zero = torch.tensor(all(not bool(local(g).any()) for g in grads), device=local(grads[0]).device)
    shard = next((s for s in (row_shard(p) for g in optimizer.param_groups for p in g["params"]) if s is not None),
                 None)
    return bool(zero if shard is None else all_ranks_true(zero.reshape(1), shard))


@functools.lru_cache(maxsize=None)
def _svd_factors_column_major(device_type: str) -> tuple[bool, bool]:
    """Whether ``thin_svd`` returns (U, Vh) column-major on this kind of device (LAPACK's layout on CPU)."""
    U, _, Vh = thin_svd(torch.eye(3, 2, device=device_type), raw=True)
    return U.stride(0) < U.stride(1), Vh.stride(0) < Vh.stride(1)


def _identity(rows: int, cols: int, dtype: torch.dtype, device: torch.device, column_major: bool) -> torch.Tensor:
    """The first ``rows`` × ``cols`` block of the identity, laid out row- or column-major."""
    if column_major:
        return torch.eye(cols, rows, dtype=dtype, device=device).t()
    return torch.eye(rows, cols, dtype=dtype, device=device)


def _basis(projector: Projector, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
           column_major: bool) -> torch.Tensor:
    """A stand-in P: r × n (right side) or m × r (left side)."""
    m, n = shape
    r = min(projector.rank, m, n)
    return _identity(r, n, dtype, device, column_major) if projector.state["proj_right"] else \
        _identity(m, r, dtype, device, column_major)


def _svd(projector: SVDProjector, shape, dtype, device) -> None:
    # the refresh keeps the SVD factor's own layout in fp32 (``compact_like``) and converts other dtypes row-major
    left, right = _svd_factors_column_major(torch.device(device).type)
    column_major = dtype == torch.float32 and (right if projector.state["proj_right"] else left)
    projector.state["proj_ortho"] = _basis(projector, shape, dtype, device, column_major)


def _rsvd(projector: RandomizedSVDProjector, shape, dtype, device) -> None:
    projector.state["proj_ortho"] = _basis(projector, shape, dtype, device, column_major=False)


def _two_sided(projector: TwoSidedSVDProjector, shape, dtype, device) -> None:
    m, n = shape
    r = min(projector.rank, m, n)
    projector.state["proj_ortho"] = _identity(m, r, dtype, device, column_major=False)
    projector.state["proj_ortho_right"] = _identity(r, n, dtype, device, column_major=False)


def _dct(projector: DCTProjector, shape, dtype, device) -> None:
    d = shape[1] if projector.state["proj_right"] else shape[0]
    projector.state["proj_indices"] = torch.arange(min(projector.rank, d), dtype=torch.int32, device=device)
    projector.state["proj_dim"] = d
    projector.state["proj_dtype_ref"] = torch.empty(0, dtype=dtype, device=device)


def _random(projector: RandomProjector, shape, dtype, device) -> None:
    projector.state["proj_seed"] = int(projector.seed)  # what the first refresh writes (no draw: P is drawn at use)
    projector.state["proj_dim"] = shape[1] if projector.state["proj_right"] else shape[0]
    projector.state["proj_dtype_ref"] = torch.empty(0, dtype=dtype, device=device)


#: by exact type: a subclass may keep more state than its base writes here, and takes the real refresh
_STAND_INS: dict[type, Callable[..., None]] = {
    SVDProjector: _svd, RandomizedSVDProjector: _rsvd, TwoSidedSVDProjector: _two_sided, DCTProjector: _dct,
    RandomProjector: _random,
}


def write_stand_in(projector: Projector, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device | str) -> bool:
    """Write into the projector's state what a refresh from an m × n (``shape``: the whole matrix, also under FSDP2)
    gradient of ``dtype`` on ``device`` would write, with a stand-in basis; False when this kind takes the real
    refresh."""
    inner = projector.inner if isinstance(projector, ShardedProjector) else projector
    write = _STAND_INS.get(type(inner))
    if write is None:
        return False
    inner.state["proj_right"] = Projector.is_right(shape)
    write(inner, tuple(shape), dtype, device)
    if isinstance(projector, ShardedProjector):
        projector.keep_own_rows()
    return True

