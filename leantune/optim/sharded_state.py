"""Checkpoints of FSDP2-sharded optimizer state: DTensors that ``torch.distributed.checkpoint`` can reshard.

Under FSDP2 each rank updates its rows W_k of W ∈ R^{m×n} (``sharded.py``), so part of a parameter's state covers
only those rows and part is the same on every rank:

* rows of W (row-sharded like W): the moments of a plain (unprojected) parameter (W_k's shape), the moments of the
  right-side projection R_k = G_k Pᵀ (m_k × r), a left-side basis P_k (m_k × r);
* the same on every rank (replicated): the step, a right-side P (r × n), the moments of a left-side R = Σ_k P_kᵀ G_k
  (r × n), DCT indices, random-projection seeds, Fira's previous norm.

``optimizer.state_dict()`` returns the row-sharded entries as DTensors placed ``Shard(0)`` on the parameter's mesh,
with the global shape (m, …): ``get_optimizer_state_dict`` then saves them whole (full state dict) or shard by shard
(DCP), and either can be loaded by another number of processes. Replicated entries stay plain tensors (DCP writes
them once). ``load_state_dict`` takes DTensors (its own rows), plain tensors of this rank's rows (per-rank state dicts
written before this module), or plain tensors with all m rows (a full state dict loaded directly: it keeps its rows).

With ``shard_replicated=True`` (``sharded.py``) the replicated r × n entries are divided too: a left side's moments by
columns (``Shard(1)`` of (r, n)), a right side's stored P by rows (``Shard(0)`` of (r, n)); loading a whole one into a
divided optimizer keeps this rank's chunk, and DCP reshards either way.

8-bit moments (bitsandbytes: uint8 codes c, one absmax a_b per block b of 256 consecutive numbers of the flattened
local tensor) depend on where the blocks fall, which depends on the process count. They are saved as the codes (rows)
and an **expanded absmax** â_i = a_{block(i)} per number (rows, float32), which does not. Loading rebuilds the blocks
of the loading rank: a block whose numbers all carry one â keeps their codes and that absmax (bit for bit: always the
case on the same process count and layout); a block that mixes saved blocks is requantized from the values
v_i = code(c_i)·â_i: a = max_i |v_i|, c_i = argmin_j |code_j·a − v_i| (within one 8-bit step of the saved values).
"""

from __future__ import annotations

from typing import Any

import torch

from leantune._utils import is_sharded, local
from leantune.optim.sharded import row_shard

#: state entries that hold rows of a projected parameter, by side (see the module docstring)
RIGHT_ROW_KEYS = ("exp_avg", "exp_avg_sq", "state1", "state2")
LEFT_ROW_KEYS = ("proj_ortho",)
#: 8-bit codes and the absmax of their blocks
EIGHT_BIT = (("state1", "absmax1"), ("state2", "absmax2"))
BLOCK = 256


def _pairs(optimizer: Any, state_dict: dict[str, Any]):
    """(parameter, its group, its saved key) for every parameter, in the optimizer's order."""
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups):
        for key, p in zip(saved_group["params"], group["params"]):
            yield p, group, key


def row_keys(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """The entries of ``state`` (a parameter's, local) that hold rows of ``p``."""
    if group.get("rank") is None or p.ndim != 2 or "proj_right" not in state:
        shape = tuple(local(p).shape)
        return [k for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step" and tuple(v.shape) == shape]
    keys = RIGHT_ROW_KEYS if state["proj_right"] else LEFT_ROW_KEYS
    rows = local(p).shape[0]
    return [k for k in keys if isinstance(state.get(k), torch.Tensor) and state[k].ndim >= 1
            and state[k].shape[0] == rows]


def divided_keys(p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """``{key: (dim, r, n)}``: the r × n entries ``shard_replicated`` divides along ``dim`` (module docstring)."""
    if not group.get("shard_replicated") or group.get("rank") is None or p.ndim != 2 or "proj_right" not in state:
        return {}
    m, n = p.shape
    r = min(int(group["rank"]), m, n)
    if state["proj_right"]:
        stored = group.get("projector") in ("svd", "rsvd") and isinstance(state.get("proj_ortho"), torch.Tensor)
        return {"proj_ortho": (0, r, n)} if stored else {}
    return {k: (1, r, n) for k in ("exp_avg", "exp_avg_sq") if isinstance(state.get(k), torch.Tensor)}


def _chunk(t: torch.Tensor, dim: int, whole: int, p: torch.Tensor) -> torch.Tensor:
    """This rank's chunk along ``dim`` of a tensor ``whole`` long there (itself when it is already one)."""
    if t.shape[dim] != whole:
        return t
    start, size = row_shard(p).chunk(whole)
    return t.narrow(dim, start, size).contiguous()


def _expanded_absmax(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """â_i = absmax of the block of number i (codes' shape, float32)."""
    per = absmax.float().repeat_interleave(BLOCK)[:codes.numel()]
    return per.reshape(codes.shape).clone()


def _from_expanded(codes: torch.Tensor, expanded: torch.Tensor,
                   qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The blockwise codes and absmax of this layout from codes + expanded absmax (module docstring)."""
    n = codes.numel()
    blocks = (n + BLOCK - 1) // BLOCK
    flat_c, flat_a = codes.reshape(-1).long(), expanded.reshape(-1).float()
    pad = blocks * BLOCK - n
    a = torch.nn.functional.pad(flat_a, (0, pad), value=float("nan")).reshape(blocks, BLOCK)
    hi = torch.where(a.isnan(), -torch.inf, a).amax(1)
    lo = torch.where(a.isnan(), torch.inf, a).amin(1)
    absmax = hi.clone()
    out = flat_c.clone()
    mixed = (hi != lo).nonzero().flatten()
    qmap = qmap.to(codes.device).float()
    for b in mixed.tolist():  # only where another layout's blocks meet: requantize their values
        sl = slice(b * BLOCK, min((b + 1) * BLOCK, n))
        values = qmap[flat_c[sl]] * flat_a[sl]
        amax = values.abs().max()
        absmax[b] = amax
        if float(amax) > 0:
            out[sl] = (qmap[None, :] * amax - values[:, None]).abs().argmin(1)
        else:
            out[sl] = (qmap.abs()).argmin()
    return out.to(torch.uint8).reshape(codes.shape), absmax


def _check_global_shapes(name: str, key: Any, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    """A DTensor entry must be rows of ``p`` — global shape (m, …) — or a divided r × n entry; anything else is from
    another model (its local rows could still happen to fit), so it is refused naming the entry."""
    m = p.shape[0]
    divided = (min(int(group["rank"]), *p.shape), p.shape[1]) if group.get("rank") and p.ndim == 2 else None
    for k, v in state.items():
        if is_sharded(v) and v.shape[0] != m and tuple(v.shape) != divided:
            raise ValueError(f"{name}.load_state_dict: {k} of parameter {key} is a DTensor of global shape "
                             f"{tuple(v.shape)}, but this parameter {tuple(p.shape)} needs {m} rows (or an r × n "
                             f"{divided} entry): the checkpoint is from another model")


def globalize(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the rows of FSDP2 parameters as ``Shard(0)`` DTensors of the global shape, and 8-bit blocks
    as codes + expanded absmax (module docstring). Unsharded parameters' entries are returned as they are."""
    from torch.distributed.tensor import DTensor, Shard

    states = dict(state_dict["state"])
    for p, group, key in _pairs(optimizer, state_dict):
        if not is_sharded(p) or key not in states:
            continue
        # what stays a plain tensor is written once and, loading a full state dict, broadcast from rank 0: torch
        # (2.13) broadcasts a tensor's storage as it lies, so a column-major one (an fp32 right-side P, laid out as
        # the references' view) arrived transposed on the other ranks; contiguous copies arrive as they are
        state = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in states[key].items()}
        rows = row_keys(p, group, state)
        for codes_key, absmax_key in EIGHT_BIT:
            if codes_key in rows and absmax_key in state:
                state[absmax_key] = _expanded_absmax(state[codes_key], state[absmax_key])
                rows.append(absmax_key)
        placed = {k: (0, (p.shape[0], *state[k].shape[1:])) for k in rows}
        placed.update({k: (dim, (r, n)) for k, (dim, r, n) in divided_keys(p, group, state).items()})
        for k, (dim, shape) in placed.items():
            stride = torch.empty(shape, device="meta").stride()
            state[k] = DTensor.from_local(state[k].contiguous(), p.device_mesh, [Shard(dim)], run_check=False,
                                          shape=shape, stride=stride)
        states[key] = state
    return {**state_dict, "state": states}


def localize(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`globalize` for this rank: DTensors to their local rows, whole-matrix rows of a sharded
    parameter to this rank's rows, expanded 8-bit absmax to this layout's blocks. A state dict without any of these
    (one process; per-rank state dicts of earlier versions) is returned unchanged."""
    states = dict(state_dict["state"])
    qmaps = (getattr(optimizer, "_qmap1", None), getattr(optimizer, "_qmap2", None))
    for p, group, key in _pairs(optimizer, state_dict):
        if key not in states:
            continue
        _check_global_shapes(type(optimizer).__name__, key, p, group, states[key])
        state = {k: local(v) if is_sharded(v) else v for k, v in states[key].items()}
        if is_sharded(p):
            shard = row_shard(p)
            full = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.ndim >= 1 and
                    v.shape[0] == shard.full_shape[0] != shard.rows}
            local_state = {**state, **{k: v[shard.start:shard.start + shard.rows] for k, v in full.items()}}
            for k in row_keys(p, group, local_state):  # only what is rows of p: an r×n moment is never cut
                state[k] = local_state[k]
            for codes_key, absmax_key in EIGHT_BIT:
                if absmax_key in full and codes_key in full:
                    state[absmax_key] = local_state[absmax_key]
            for k, (dim, r, n) in divided_keys(p, group, state).items():  # whole r × n: this rank's chunk
                state[k] = _chunk(state[k], dim, r if dim == 0 else n, p)
        for (codes_key, absmax_key), qmap in zip(EIGHT_BIT, qmaps):
            codes, absmax = state.get(codes_key), state.get(absmax_key)
            if isinstance(codes, torch.Tensor) and isinstance(absmax, torch.Tensor) and qmap is not None and \
                    absmax.shape == codes.shape and codes.ndim >= 1 and codes.numel() != 1:
                state[codes_key], state[absmax_key] = _from_expanded(codes, absmax, qmap)
        states[key] = state
    return {**state_dict, "state": states}


__all__ = ["divided_keys", "globalize", "localize", "row_keys"]
