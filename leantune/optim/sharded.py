"""Low-rank optimizers on FSDP2-sharded parameters: the projection runs where the rows are.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every weight W ∈ R^{m×n} by rows: rank k holds its m_k rows
W_k and, after the backward's reduce-scatter, the averaged gradient's rows G_k. With the GaLore projector P of rank r
and scale α (``projectors.py``), everything but the left projection stays on the rank:

* right side (m ≥ n; P ∈ R^{r×n}, the same on every rank):  R_k = G_k Pᵀ,  back(N)_k = α N_k P  — no communication;
  the moments of R (m×r) are row-sharded like W, so each rank keeps m_k×r of them;
* left side (m < n; P ∈ R^{m×r}, rank k keeps only its rows P_k):  R = Σ_k P_kᵀ G_k — **one all-reduce of r×n
  numbers** per step —, back(N)_k = α P_k N; the r×n moments are the same on every rank;
* a projector refresh (every T steps) needs the singular vectors (or DCT scores) of the whole G: G is all-gathered
  then (m×n numbers once per T steps) and every rank computes the same P from the same numbers.

With ``shard_replicated=True`` (GaLore AdamW and DCT-AdamW) what is whole on every rank above is divided too, so the
per-rank state is (one process's state)/N, for communication that is counted the same way:

* left side, ZeRO-1 style: rank k owns the columns C_k of the r×n moments. R is **reduce-scattered** by columns,
  R[:, C_k] = Σ_j P_jᵀ G_j[:, C_k]; Adam is element-wise, so the moments and N[:, C_k] come out exactly as before;
  the r×n direction N is **all-gathered**, because back(N)_k = α P_k N needs every column. A reduce-scatter and an
  all-gather move what one all-reduce moves (ring volumes below): no extra traffic;
* right side, stored bases (SVD, rSVD): rank k keeps its chunk of the r rows of P (r×n) and the step **all-gathers**
  P once, just in time (R_k = G_k Pᵀ contracts over all n). A DCT basis is computed from r stored indices: nothing
  to divide. A refresh gathers the previous P once more (the sign orientation compares old and new bases).

Chunks follow DTensor's ``Shard`` layout (``torch.chunk``: ⌈d/N⌉ per rank, the last ones shorter or empty), so a
checkpoint saves them as DTensors of the whole (r, n) (``sharded_state.py``). The log counts ring volumes, the bytes
each rank sends: an all-reduce of S bytes sends 2(N−1)/N·S, an all-gather or a reduce-scatter (N−1)/N·S.

Norms an update rule takes over a whole matrix (Fira's growth limiter and channel norms, per-parameter clipping)
become local sums of squares plus one all-reduce, and the non-finite guard's decision is all-reduced, so that every
rank skips a parameter together or not at all. Everything communicated is counted (:func:`communication_log`).

Supported: the optimizers whose class sets ``row_shardable`` (GaLore, 8-bit GaLore, Fira, DCT-AdamW, DCT-Fira,
rSVD GaLore) with the "svd", "rsvd" and "dct" projectors. Others need statistics across the rows of R (Adafactor's
factored moments, APOLLO's channel scaling, Natural GaLore's Fisher, Conda's and GradNormLoRP's normalisations) and
are refused at construction, as are per-layer updates and ``moment_policy="rotate"`` on sharded parameters.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from leantune._utils import channel_norms, is_sharded, local
from leantune.optim.projectors import Projector, StoredBasisProjector, compact_like
from leantune.optim.svd import dots

ROW_SHARDABLE_PROJECTORS = ("svd", "rsvd", "dct")
#: names of the optimizers whose spec says row-shardable (filled by ``spec.py``, which sits above this module)
ROW_SHARDABLE_OPTIMIZERS: list[str] = []


def register_row_shardable(names: list[str]) -> None:
    """Called once by :mod:`leantune.optim.spec` with the names its table marks row-shardable."""
    ROW_SHARDABLE_OPTIMIZERS[:] = names


@dataclass(frozen=True)
class RowShard:
    """This rank's rows of a parameter sharded on dim 0: ``rows`` of them from ``start``, of ``full_shape``."""

    group: Any
    rows: int
    start: int
    full_shape: tuple[int, ...]

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def chunk(self, d: int) -> tuple[int, int]:
        """``(start, size)`` of this rank's chunk of d (DTensor's ``Shard`` layout: ⌈d/N⌉ each, the last ones
        shorter or empty)."""
        return chunk_of(d, self.world, self.rank)


def chunk_of(d: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, size)`` of chunk ``rank`` of d split as ``torch.chunk`` (and DTensor's ``Shard``) split it."""
    c = -(-d // world)
    start = min(rank * c, d)
    return start, max(0, min(c, d - start))


def row_shard(p: torch.Tensor) -> RowShard | None:
    """The :class:`RowShard` of an FSDP2 parameter (None for a plain tensor); anything but FSDP2's row sharding on a
    1-D mesh is refused with the placements it has."""
    if not is_sharded(p):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"a parameter of shape {tuple(p.shape)} is a DTensor placed {tuple(p.placements)} on a "
                         f"{p.device_mesh.ndim}-D mesh; leantune's optimizers support FSDP2's row sharding "
                         "(fully_shard: Shard(0) on a 1-D mesh). For HSDP / tensor parallelism use DDP or plain AdamW.")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return RowShard(p.device_mesh.get_group(), int(shape[0]) if shape else 0, int(offset[0]) if offset else 0,
                    tuple(p.shape))


class CommunicationLog:
    """Bytes this rank sent into collectives from leantune's optimizers, by phase ("step", "refresh", "guard")."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, phase: str, nbytes: int) -> None:
        self.bytes[phase] += int(nbytes)
        self.calls[phase] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


_LOG = CommunicationLog()


def communication_log() -> CommunicationLog:
    """The process-wide :class:`CommunicationLog` (``reset()`` it before a step to measure that step)."""
    return _LOG


def _ring(nbytes: int, shard: RowShard, all_reduce: bool = False) -> int:
    """Bytes one rank sends for a collective over S = ``nbytes`` under ring algorithms (module docstring)."""
    world = shard.world
    return (2 if all_reduce else 1) * (world - 1) * int(nbytes) // world


def all_reduce_sum(t: torch.Tensor, shard: RowShard, phase: str = "step") -> torch.Tensor:
    _LOG.add(phase, _ring(t.numel() * t.element_size(), shard, all_reduce=True))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


def reduce_scatter_columns(R: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """Σ over ranks of the partial sums R (r × n), this rank's chunk of columns only (r × n_k)."""
    r, n = R.shape
    c = -(-n // shard.world)
    start, size = shard.chunk(n)
    rows = torch.zeros(c * shard.world, r, dtype=R.dtype, device=R.device)  # columns as rows: chunks contiguous
    rows[:n] = R.t()
    out = torch.empty(c, r, dtype=R.dtype, device=R.device)
    _LOG.add("step", _ring(R.numel() * R.element_size(), shard))
    dist.reduce_scatter_single(out, rows, op=dist.ReduceOp.SUM, group=shard.group)
    return out[:size].t().contiguous()


def _all_gather_rows(part: torch.Tensor, total: int, shard: RowShard, phase: str) -> torch.Tensor:
    """The ``total`` rows whose chunks (:meth:`RowShard.chunk`) the ranks hold, from this rank's ``part``."""
    c = -(-total // shard.world)
    padded = torch.zeros(c, *part.shape[1:], dtype=part.dtype, device=part.device)
    padded[:part.shape[0]] = part
    out = torch.empty(c * shard.world, *part.shape[1:], dtype=part.dtype, device=part.device)
    _LOG.add(phase, _ring(total * math.prod(part.shape[1:]) * part.element_size(), shard))
    dist.all_gather_single(out, padded, group=shard.group)
    return out[:total]


def all_gather_columns(part: torch.Tensor, n: int, shard: RowShard) -> torch.Tensor:
    """The r × n matrix whose column chunks the ranks hold, from this rank's r × n_k ``part``."""
    return _all_gather_rows(part.t(), n, shard, "step").t()


def all_ranks_true(flag: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """Element-wise AND of a bool tensor over the ranks (one all-reduce of one byte per element)."""
    t = flag.to(torch.uint8)
    _LOG.add("guard", t.numel())
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=shard.group)
    return t.bool()


def full_gradient(grad: torch.Tensor) -> torch.Tensor:
    """The whole gradient of a row-sharded parameter (an all-gather: projector refreshes only)."""
    full = grad.full_tensor()
    world = grad.device_mesh.size()
    _LOG.add("refresh", (world - 1) * full.numel() * full.element_size() // world)
    return full


def norm_over_rows(x: torch.Tensor, shard: RowShard | None, dim: int | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖x‖₂ (over everything, or along ``dim``) of a matrix whose rows are spread over the ranks: the vector norm
    itself without sharding, else √(Σ_ranks Σ x²). ``dim=1`` (within rows) needs no communication. ``dtype``: that
    of the result (default x's)."""
    if shard is None or dim == 1:
        return torch.linalg.vector_norm(x, dim=dim, dtype=dtype) if dim is None else channel_norms(x, dim, dtype)
    squares = x.float().square().sum(dim=dim) if x.dtype != torch.float64 else x.square().sum(dim=dim)
    return all_reduce_sum(squares, shard).sqrt().to(dtype or x.dtype)


class ShardedProjector(Projector):
    """A projector of the whole m×n matrix, applied to this rank's rows (module docstring). ``divide``: also divide
    what is otherwise whole on every rank (``shard_replicated``): the left side's R by columns, a right-side stored P
    by rows."""

    def __init__(self, inner: Projector, shard: RowShard, divide: bool = False) -> None:  # noqa: D107
        self.inner, self.shard = inner, shard
        self.state, self.rank, self.update_proj_gap, self.scale = inner.state, inner.rank, inner.update_proj_gap, \
            inner.scale
        self.kind, self.one_sided = inner.kind, inner.one_sided
        right = Projector.is_right(shard.full_shape)
        #: (start, size, n): this rank's columns of the left side's r × n R, its moments and N (None: whole)
        self.columns = (*shard.chunk(shard.full_shape[1]), shard.full_shape[1]) if divide and not right else None
        #: whether this rank stores only its chunk of the rows of a right-side P (r × n)
        self.rows_of_p = divide and right and isinstance(inner, StoredBasisProjector)
        self._full: torch.Tensor | None = None  # P gathered once per step (a projector lives for one step)
        if hasattr(inner, "overlap"):  # a stored basis oriented against the previous one, whose rows are spread
            inner.overlap = self._overlap

    @property
    def spread(self) -> bool:
        """Whether R is spread over the ranks (rows on the right side, columns when divided on the left)."""
        return bool(self.state["proj_right"]) or self.columns is not None

    def _overlap(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """⟨p_i^old, p_i^new⟩ per basis vector when the state holds this rank's rows of a left-side P (m × r): the
        partial sum over those rows, summed over ranks (r numbers per refresh); a whole P: the plain sum."""
        if old.shape == new.shape:
            return dots(old, new, self.state["proj_right"])
        part = dots(old, new[self.shard.start:self.shard.start + self.shard.rows], right=False)
        return all_reduce_sum(part, self.shard, phase="refresh")

    @property
    def initialized(self) -> bool:
        return self.inner.initialized

    def needs_refresh(self, step: int) -> bool:
        return self.inner.needs_refresh(step)

    def _gathered_p(self, phase: str) -> torch.Tensor:
        """The whole right-side P (r × n) from the ranks' chunks of its rows."""
        rows = min(self.rank, *self.shard.full_shape)
        return compact_like(_all_gather_rows(self.state["proj_ortho"].contiguous(), rows, self.shard, phase))

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        """Refresh from the whole gradient ``grad`` (every rank the same); the left side keeps only its rows of P,
        a divided right side only its chunk of P's rows (the previous P is gathered for the orientation)."""
        if self.rows_of_p and "proj_ortho" in self.state:
            self.state["proj_ortho"] = self._gathered_p("refresh")
        ok = self.inner.refresh(grad, step)
        self.keep_own_rows(ok)
        return ok

    def keep_own_rows(self, fresh: bool = True) -> None:
        """After the inner projector wrote a whole P: keep this rank's rows of a ``fresh`` left-side P, or (divided)
        this rank's chunk of a right-side P's rows (the whole one serves this step)."""
        stored = self.state.get("proj_ortho")
        if fresh and stored is not None and not self.state["proj_right"] and \
                stored.shape[0] == self.shard.full_shape[0]:
            self.state["proj_ortho"] = compact_like(stored[self.shard.start:self.shard.start + self.shard.rows])
        if stored is not None and self.rows_of_p:
            self._full = stored
            start, size = self.shard.chunk(stored.shape[0])
            self.state["proj_ortho"] = compact_like(stored[start:start + size])

    def matrix(self) -> torch.Tensor:
        if self.rows_of_p:
            if self._full is None:
                self._full = self._gathered_p("step")
            return self._full
        P = self.inner.matrix()
        if not self.state["proj_right"] and P.shape[0] == self.shard.full_shape[0] != self.shard.rows:
            P = P[self.shard.start:self.shard.start + self.shard.rows]  # computed kinds (DCT): this rank's rows
        return P

    def project(self, grad: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None and not self.state["proj_right"]:  # P's rows would need this rank's slice of ``rows``
            raise NotImplementedError("a row scale on a left-side projection of FSDP2-sharded rows")
        R = super().project(grad, rows)  # right: G_k Pᵀ (this rank's rows of R); left: P_kᵀ G_k (a partial sum)
        if self.state["proj_right"]:
            return R
        return all_reduce_sum(R, self.shard) if self.columns is None else reduce_scatter_columns(R, self.shard)

    def complete(self, N: torch.Tensor) -> torch.Tensor:
        """The whole direction the back-projection needs: N itself, or (divided left side) all of its columns."""
        return N if self.columns is None else all_gather_columns(N, self.columns[2], self.shard)

    def transition(self, old_matrix: torch.Tensor) -> torch.Tensor:  # pragma: no cover - refused at construction
        raise NotImplementedError("moment_policy='rotate' is not supported on FSDP2-sharded parameters")


def refuse_divided_unsharded(optimizer: Any) -> None:
    """Before a step: ``shard_replicated=True`` needs FSDP2-sharded parameters by now (nothing has changed yet)."""
    divided = [p for g in optimizer.param_groups if g.get("shard_replicated") for p in g["params"]]
    if divided and not any(is_sharded(p) for p in divided):
        raise ValueError(f"{type(optimizer).__name__}(shard_replicated=True) divides FSDP2-sharded parameters' state "
                         "over the ranks, but none of its parameters is sharded: call fully_shard "
                         "(leantune.shard_model) on the model (or train under accelerate's FSDP2), or leave "
                         "shard_replicated off.")
    optimizer.divided_unsharded = False


def check_sharded_optimizer(optimizer: Any) -> None:
    """Refuse, before any step, what the row-local algorithm cannot do on FSDP2 parameters (module docstring)."""
    name = type(optimizer).__name__
    groups = set()
    params = [(n, p) for g in optimizer.param_groups
              for n, p in zip(g.get("param_names") or [f"a parameter of shape {tuple(p.shape)}" for p in g["params"]],
                              g["params"])]
    divided = [g for g in optimizer.param_groups if g.get("shard_replicated")]
    if divided and not getattr(optimizer, "replicated_shardable", False):
        raise ValueError(f"{name}(shard_replicated=True) is not supported: "
                         f"{getattr(optimizer, 'replicated_refusal', 'its update needs the whole projected gradient')}."
                         " Use galore_adamw or dct_adamw with shard_replicated=True, or this optimizer without it.")
    # Trainer + accelerate build the optimizer first and shard the model after (swapping in the DTensors): so this
    # is checked again before the first step (``LowRankOptimizer._check_groups``), when it must hold
    optimizer.divided_unsharded = bool(divided) and not any(is_sharded(p) for g in divided for p in g["params"])
    if any(is_sharded(p) for _, p in params):
        plain = [n for n, p in params if not is_sharded(p)]
        if plain:
            raise ValueError(f"{name}: {plain[0]} (and {len(plain) - 1} more) is not sharded by FSDP2 while the others "
                             "are, so its gradient is not averaged across ranks and each rank would train its own "
                             "copy. Call fully_shard on a module that holds it, e.g. on the PeftModel itself as the "
                             "root after sharding its decoder layers (Compacter's shared rule lives there).")
    for group in optimizer.param_groups:
        sharded = [p for p in group["params"] if is_sharded(p)]
        if not sharded:
            continue
        for p in sharded:
            groups.add(id(row_shard(p).group))
        if optimizer.layerwise:
            raise ValueError(f"{name}(layerwise=True) on FSDP2-sharded parameters: per-layer updates run inside "
                             "backward, before FSDP2's reduce-scatter has averaged the gradient. Use DDP for "
                             "per-layer updates (optimizer.attach_ddp), or layerwise=False under FSDP2.")
        if "rank" not in group:  # plain (full-rank) groups update element-wise: row-local as they are
            continue
        if not getattr(optimizer, "row_shardable", False):
            why = getattr(optimizer, "fsdp2_refusal", None) or \
                "its update needs statistics across all rows of the projected gradient"
            raise ValueError(f"{name} on FSDP2-sharded parameters is not supported: {why}. Use one of " +
                             ", ".join(ROW_SHARDABLE_OPTIMIZERS) + " under FSDP2, or this optimizer under DDP.")
        if group["projector"] not in ROW_SHARDABLE_PROJECTORS:
            raise ValueError(f"{name}: projector {group['projector']!r} on FSDP2-sharded parameters is not supported; "
                             f"use one of {ROW_SHARDABLE_PROJECTORS}.")
        if group.get("moment_policy") == "rotate":
            raise ValueError(f"{name}: moment_policy='rotate' on FSDP2-sharded parameters is not supported (the "
                             "change of basis of a left projector spans all rows); use 'keep' or 'reset'.")
    if len(groups) > 1:
        raise ValueError(f"{name}: the sharded parameters live on {len(groups)} different process groups; leantune's "
                         "optimizers support one FSDP2 mesh per optimizer.")


__all__ = ["CommunicationLog", "RowShard", "ShardedProjector", "check_sharded_optimizer", "communication_log",
           "refuse_divided_unsharded",
           "full_gradient", "is_sharded", "local", "norm_over_rows", "row_shard"]
