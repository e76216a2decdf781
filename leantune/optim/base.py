"""Shared machinery of the low-rank optimizers: param-group config, projector refresh, moment policy, stepping.

A param group is low-rank when it has a ``rank`` key (the galore-torch convention); its 2-D parameters are then
projected, everything else in the same optimizer gets the plain (full-rank) update.  Group keys:

``rank``, ``update_proj_gap`` (T), ``scale`` (alpha), ``projector`` ("svd" | "rsvd" | "dct"),
``moment_policy`` ("keep" | "reset" | "rotate": what happens to the low-rank moments when P changes),
``svd_signs`` ("aligned": each new SVD basis sign-oriented, ``leantune.optim.svd``; "lapack": LAPACK's raw signs, as
galore-torch / fira; None, the default: "lapack" with ``reference_adam`` / ``reference_order``, else "aligned"),
``max_grad_norm_per_param`` (clip each parameter's gradient by its own norm; None = off).

Subclasses implement :meth:`LowRankOptimizer.update` (their update rule for one parameter, given a
:class:`~leantune.optim.step.ParamStep`).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from leantune._utils import NonFiniteGradientWarning
from leantune.optim.checkpoint import StateLoadingMixin
from leantune.optim.dct import shared_dct_basis
from leantune.optim.layerwise import LayerwiseMixin
from leantune.optim.offload import OFFLOAD_TARGETS, StateOffload
from leantune.optim.projector_kinds import PROJECTOR_KINDS, PROJECTOR_STATE_KEYS, make_projector
from leantune.optim.projectors import Projector
from leantune.optim.restarts import Restarts
from leantune.optim.sharded import (
    ShardedProjector,
    all_ranks_true,
    check_sharded_optimizer,
    full_gradient,
    is_sharded,
    local,
    norm_over_rows,
    refuse_divided_unsharded,
    row_shard,
)
from leantune.optim.sharded_state import globalize
from leantune.optim.state_init import is_init_step, write_stand_in
from leantune.optim.step import ParamStep

MOMENT_POLICIES = ("keep", "reset", "rotate")


class _NonFiniteProjection(Exception):
    """Raised by :meth:`LowRankOptimizer.project` to skip a parameter whose projected gradient is not finite."""


LOW_RANK_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "projector": "svd",
    "moment_policy": "keep",
    "svd_signs": None,
    "max_grad_norm_per_param": None,
}
SVD_SIGNS = ("aligned", "lapack")


class LowRankOptimizer(LayerwiseMixin, StateLoadingMixin, Optimizer):
    """Base class: projector handling + per-parameter stepping (``step()`` or layer-wise hooks)."""

    #: state keys living in the low-rank space (reset / rotated on refresh)
    moment_keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    supports_rotate: bool = True
    #: param-group keys of reference packages accepted as spellings of ours (e.g. Fira's ``alpha`` for ``scale``)
    group_aliases: dict[str, str] = {}
    #: keys accepted besides the defaults: the group's rank, and galore-torch/fira's projection type ("std" only)
    extra_group_keys: tuple[str, ...] = ("params", "param_names", "rank", "proj_type", "cycle_step")
    #: defaults of projected groups (a method without projector choice, e.g. Conda, narrows them)
    low_rank_defaults: dict[str, Any] = LOW_RANK_DEFAULTS
    #: whether fp16 parameters work (Adam moments in fp16 underflow: ε = 1e-8 is 0 there, and m/√v turns NaN)
    supports_fp16: bool = False
    #: whether the update rule runs on FSDP2 row shards (``sharded.py``): row-local but for counted reductions
    row_shardable: bool = False
    #: whether ``shard_replicated=True`` may divide the state that is whole on every rank (``sharded.py``)
    replicated_shardable: bool = False
    #: per-parameter state keys this optimizer writes (a checkpoint with others is from another optimizer)
    state_keys: tuple[str, ...] = ("step", "exp_avg", "exp_avg_sq") + PROJECTOR_STATE_KEYS

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        layerwise: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        defaults = {**self.low_rank_defaults, **defaults}
        super().__init__(params, defaults)
        self._param_seed: dict[torch.Tensor, int] = {}
        for gi, group in enumerate(self.param_groups):
            self._validate_group(gi, group)
            for p in group["params"]:
                self._param_seed[p] = len(self._param_seed)
        self.restarts = None  # momentum reset / refactorization cycles (enable_restarts)
        self.offload: StateOffload | None = None  # state in host memory between updates (enable_offload)
        #: tests and benchmarks: compute every projected step by this path (a name of :meth:`path`'s rule) instead
        #: of the one the rule picks; None in normal use
        self.force_path: str | None = None
        #: the state was written by torch.distributed.checkpoint's zero-gradient init step (``state_init.py``)
        self.stand_in = False
        self._init_step = False
        self._init_layerwise(layerwise, accumulation_steps)
        check_sharded_optimizer(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` after mapping reference spellings and refusing keys nobody reads (they would
        otherwise be silently ignored, e.g. Fira's ``alpha`` training with the default scale)."""
        index = len(getattr(self, "param_groups", []))
        param_group = dict(param_group)
        for alias, key in self.group_aliases.items():
            if alias in param_group:
                value = param_group.pop(alias)
                if key in param_group and param_group[key] != value:
                    raise ValueError(f"param group {index}: {alias}={value!r} and {key}={param_group[key]!r} are the "
                                     f"same setting of {type(self).__name__}; give one")
                param_group[key] = value
        accepted = set(self.defaults) | set(self.extra_group_keys)
        unknown = sorted(set(param_group) - accepted)
        if unknown:
            raise ValueError(f"param group {index}: unknown key(s) {unknown} for {type(self).__name__}; accepted: "
                             f"{sorted(accepted | set(self.group_aliases))}")
        if param_group.get("proj_type", "std") != "std":
            raise ValueError(f"param group {index}: proj_type={param_group['proj_type']!r} is not supported; leantune "
                             "projects on the smaller side ('std')")
        param_group.pop("proj_type", None)
        super().add_param_group(param_group)
        if hasattr(self, "_param_seed"):  # a group added after construction: validated and seeded as the others
            self._validate_group(index, self.param_groups[-1])
            for p in self.param_groups[-1]["params"]:
                self._param_seed.setdefault(p, len(self._param_seed))

    def _validate_group(self, index: int, group: dict[str, Any]) -> None:
        if group["lr"] < 0:
            raise ValueError(f"param group {index}: lr must be >= 0, got {group['lr']}")
        if not self.supports_fp16 and any(p.dtype == torch.float16 for p in group["params"]):
            raise ValueError(
                f"{type(self).__name__} keeps its Adam moments in the parameters' dtype, and in fp16 they underflow "
                "(ε = 1e-8 is 0 in fp16) and turn the update into NaN. Train fp16 with fp32 master weights "
                "(Trainer(fp16=True) / torch.autocast), or use bf16 parameters, or galore_adafactor (fp32 inside).")
        if "rank" in group:
            self._validate_low_rank(index, group)

    def _validate_low_rank(self, index: int, group: dict[str, Any]) -> None:
        """Checks of a ``rank`` group: known projector and moment policy, and only 2-D targets with both sides
        >= rank (each refusal names the parameter when the groups carry ``param_names``)."""
        if not isinstance(group["rank"], int) or isinstance(group["rank"], bool) or group["rank"] < 1:
            raise ValueError(f"param group {index}: rank must be an integer >= 1, got {group['rank']!r}")
        if group["projector"] not in PROJECTOR_KINDS:
            raise ValueError(f"param group {index}: projector={group['projector']!r}, expected one of {PROJECTOR_KINDS}")
        if group["moment_policy"] not in MOMENT_POLICIES:
            raise ValueError(
                f"param group {index}: moment_policy={group['moment_policy']!r}, expected one of {MOMENT_POLICIES}"
            )
        if group.get("svd_signs") not in (None, *SVD_SIGNS):
            raise ValueError(f"param group {index}: svd_signs={group['svd_signs']!r}, expected one of {SVD_SIGNS} or None")
        if group["moment_policy"] == "rotate" and group["projector"] == "svd2":
            raise ValueError(f"param group {index}: the two-sided projector ('svd2') cannot rotate moments; use "
                             "moment_policy='keep' or 'reset'")
        if group["moment_policy"] == "rotate" and not self.supports_rotate:
            raise ValueError(
                f"{type(self).__name__} cannot rotate its moments (they are quantized or factored); "
                "use moment_policy='keep' or 'reset'."
            )
        for label, p in self._labelled(index, group):
            if group["rank"] > min(p.shape):
                raise ValueError(
                    f"param group {index}: rank={group['rank']} exceeds the smaller side of {label} {tuple(p.shape)}; "
                    f"use rank <= {min(p.shape)} for it (a rank-{min(p.shape)} projection is already full rank), or "
                    "leave it out of target_modules.")

    @staticmethod
    def _labelled(index: int, group: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of a projected group's parameters; refuses anything that is not a matrix."""
        names = group.get("param_names") or [f"parameter {i} of the group" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            if p.ndim != 2:
                raise ValueError(
                    f"param group {index}: {name} is {p.ndim}-D {tuple(p.shape)}, and only 2-D matrices can be "
                    "projected; put it in a group without 'rank' (make_param_groups does that), or leave it out of "
                    "target_modules.")
        return list(zip(names, group["params"]))

    @staticmethod
    def is_low_rank(group: dict[str, Any], p: torch.Tensor) -> bool:
        return group.get("rank") is not None and p.ndim == 2

    # ---- stepping --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step. A parameter whose gradient holds NaN/inf is skipped (weights and state untouched) with
        a :class:`NonFiniteGradientWarning`; the others step as usual."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        if self.layerwise:  # updates already happened inside backward; only flush partial windows
            self._flush_layerwise()
        else:
            todo = [(p, group) for group in self.param_groups for p in group["params"] if self.grad_of(p) is not None]
            if self.stand_in:  # a state written by the init step below and never loaded over: start afresh
                self.state.clear()
                self.stand_in = False
            self._init_step = is_init_step(self, [self.grad_of(p) for p, _ in todo])
            self.stand_in = self._init_step  # before any state is written: an error halfway leaves the mark
            plain = [(p, local(self.grad_of(p))) for p, group in todo if not self.is_low_rank(group, p)]
            finite = iter([])
            if plain:  # one pass and one sync for the finiteness check (projected ones: see _step_param)
                norms = torch._foreach_norm([g for _, g in plain])
                flags = torch.isfinite(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]))
                shard = next((s for s in (row_shard(p) for p, _ in plain) if s is not None), None)
                if shard is not None:  # FSDP2: every rank skips the same parameters
                    flags = all_ranks_true(flags, shard)
                finite = iter(flags.tolist())
            for p, group in todo:
                self._step_param(p, group, finite=None if self.is_low_rank(group, p) else next(finite))
        # torch.distributed.checkpoint's shape-only step (state_init.py) is not a step of training
        init, self._init_step = self._init_step, False
        if self.restarts is not None and not init:
            self.restarts.end_of_step(self)
        if self.offload is not None:
            self.offload.end_of_step()
        return loss

    def enable_offload(self, host: str = "cpu", device: str | torch.device | None = None,
                       step_on: str = "auto") -> None:
        """Keep the optimizer state in ``host`` memory between updates (``offload.py``); ``device``: where updates
        run (None: each parameter's device; tests: "cpu"); ``step_on``: "auto" (each update where fewer bytes move),
        "device" or "host"."""
        if host not in OFFLOAD_TARGETS:
            raise ValueError(f"offload={host!r}: the state can be kept in {OFFLOAD_TARGETS} memory")
        if any(is_sharded(p) for group in self.param_groups for p in group["params"]):
            raise ValueError(f"{type(self).__name__}: offloading the optimizer state of FSDP2-sharded parameters is "
                             "not supported (each rank already keeps 1/N of it); use offload under DDP or one "
                             "process.")
        self.offload = StateOffload(self, host, device, step_on)

    def state_dict(self) -> dict[str, Any]:
        if self.offload is not None:
            self.offload.synchronize()  # the host copies are what is saved
        return globalize(self, super().state_dict())  # FSDP2 rows as DTensors (sharded_state.py)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stand_in = False
        if self.offload is not None:
            self.offload.to_host_all()

    def enable_restarts(self, every: int, moments: str = "all", recovery_steps: int = 10,
                        pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]] | None = None) -> None:
        """Momentum reset every ``every`` steps, with LR recovery and (given ``pairs``, see
        :func:`leantune.optim.restarts.low_rank_pairs`) weight refactorization; see ``restarts.py``."""
        self.restarts = Restarts(every, moments, recovery_steps, pairs)
        for group in self.param_groups:
            group.setdefault("cycle_step", 0)

    def _check_groups(self) -> None:
        """Refuse projected groups whose tensors were swapped for 1-D ones after construction: DeepSpeed ZeRO
        replaces each group's parameters by one flat slice (and steps the groups one at a time), on which the
        projection would silently become plain Adam. (FSDP2 and accelerate swap in sharded tensors of the same
        shape: those are fine — and ``shard_replicated=True`` needs them by now.)"""
        if getattr(self, "divided_unsharded", False):
            refuse_divided_unsharded(self)
        for group in self.param_groups:
            params = group["params"]
            if group.get("rank") is not None and params and \
                    all(p.ndim != 2 and p not in self._param_seed for p in params):
                raise ValueError(
                    f"{type(self).__name__}: a projected parameter group now holds 1-D tensors it was not built with "
                    f"(shapes {[tuple(p.shape) for p in params][:3]}) — DeepSpeed ZeRO replaces the groups' "
                    "parameters by flat slices, on which a low-rank optimizer would run as plain Adam. Use leantune's "
                    "optimizers under FSDP2 (leantune.shard_model) or DDP; under DeepSpeed use torch's AdamW.")

    def _step_param(self, p: torch.Tensor, group: dict[str, Any], finite: bool | None = None) -> None:
        """What comes before every update rule: the non-finite guard, per-parameter clipping, the state, the
        projector (refreshed every T steps); then :meth:`update`. ``finite``: already checked by :meth:`step`.

        A projected parameter's gradient is not scanned here: a NaN/inf in G reaches its projection R, which
        :meth:`project` checks (r x max(m, n) instead of m x n numbers); refresh steps check G before the SVD."""
        shard = row_shard(p)  # FSDP2: the update runs on this rank's rows (sharded.py)
        if self.offload is None:
            return self._step_local(p, p if shard is None else local(p), group, finite, shard)
        if self.offload.runs_on_host(p, self.grad_of(p)):  # the gradient and weight go out, the state stays
            with self.offload.on_host(p, self.grad_of(p)) as (weight, grad):
                return self._step_local(p, weight, group, finite, shard, grad)
        with self.offload.on_device(p):  # the state comes in for this update and goes back after it
            return self._step_local(p, p, group, finite, shard)

    def _step_local(self, key: torch.Tensor, p: torch.Tensor, group: dict[str, Any], finite: bool | None,
                    shard: Any, grad: torch.Tensor | None = None) -> None:
        """:meth:`_step_param` on ``p`` (``key``'s tensor, or its rows ``shard`` on this rank; ``key`` owns the
        state; ``grad``: its gradient where it is not ``key``'s own, e.g. a host copy)."""
        grad = local(self.grad_of(key)) if grad is None else grad
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (shape {tuple(p.shape)}).")
        projected = self.is_low_rank(group, key)
        if finite is None and not projected:  # per-layer mode, or a projected group's plain parameter
            finite = self._all_ranks(torch.isfinite(grad).all(), shard)
        if finite is False:
            return self._skip(key)
        grad = self.working_grad(grad)
        if self.restarts is not None and (factor := self.restarts.lr_factor(group)) != 1.0:
            group = {**group, "lr": group["lr"] * factor}  # LR recovery after a momentum reset
        max_norm = group.get("max_grad_norm_per_param")
        if max_norm:
            # same coefficient as torch.nn.utils.clip_grad_norm_, but per parameter
            coef = (max_norm / (norm_over_rows(grad, shard) + 1e-6)).clamp(max=1.0)
            grad = grad * coef
        state = self.state[key]
        projector, source = None, None
        if projected:
            projector = self.projector_for(state, group, key)
            if shard is not None:
                projector = ShardedProjector(projector, shard, divide=bool(group.get("shard_replicated")))
            if projector.needs_refresh(state.get("step", 0)):
                source = self.projection_source(p, grad, state, group)
                if self._init_step and write_stand_in(projector, tuple(key.shape), source.dtype, source.device):
                    source = None  # shape-only: no gathered gradient, no SVD, no random draw
            if source is not None:
                if shard is not None:  # the whole matrix, every T steps (every rank computes the same P from it)
                    source = full_gradient(key.grad) if source is grad else source
                    if max_norm:
                        source = source * coef
                if not bool(torch.isfinite(source).all()):
                    return self._skip(key)
                state.setdefault("step", 0)
                if not self._refresh(projector, source, state, group) and not projector.initialized:
                    return
        state.setdefault("step", 0)
        try:
            self.update(ParamStep(p, grad, state, group, projector, shard))
        except _NonFiniteProjection:
            self._skip(key)

    def projector_for(self, state: dict[str, Any], group: dict[str, Any], key: torch.Tensor) -> Projector:
        """The projector of ``key`` for this step (a view on its state; the group's ``projector`` kind)."""
        return make_projector(group["projector"], state, group, seed=self._param_seed.get(key, 0))

    @staticmethod
    def _all_ranks(flag: torch.Tensor, shard: Any) -> bool:
        """A finiteness decision every rank of ``shard`` agrees on (``flag`` itself for a whole tensor)."""
        return bool(flag if shard is None else all_ranks_true(flag.reshape(1), shard))

    def project(self, projector: Projector, X: torch.Tensor, rows: torch.Tensor | None = None,
                shard: Any = None) -> torch.Tensor:
        """R = projector.project(diag(rows) X), refused (the parameter skipped) when it holds NaN/inf: call it
        before the update changes any state. ``shard``: the FSDP2 rows being updated (all ranks decide alike)."""
        R = projector.project(X, rows=rows)
        # one reduction instead of isfinite's four passes; a non-finite sum (NaN/inf inside, or an overflow of the
        # sum itself) is confirmed element-wise
        total = R.sum(dtype=torch.float64 if R.dtype == torch.float64 else torch.float32)
        finite = bool(torch.isfinite(total)) or bool(torch.isfinite(R).all())
        if shard is not None and projector.spread:  # R's rows (or divided columns) are spread over ranks
            finite = self._all_ranks(torch.tensor(finite, device=R.device), shard)  # all skip or none (NCCL: CUDA)
        if not finite:
            raise _NonFiniteProjection
        return R

    def _skip(self, p: torch.Tensor) -> None:
        warnings.warn(f"{type(self).__name__}: non-finite gradient (NaN/inf) for a parameter of shape "
                      f"{tuple(p.shape)}; its update was skipped this step (weights and optimizer state unchanged).",
                      NonFiniteGradientWarning, stacklevel=4)

    def projection_source(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                          group: dict[str, Any]) -> torch.Tensor:
        """The matrix whose subspace the projector tracks (the gradient; GradNormLoRP: the direction's gradient)."""
        return grad

    def working_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient as the update rule (and the projector refresh) sees it (identity; Adafactor: fp32)."""
        return grad

    #: the ways a subclass computes its projected step: its readable rule and the twins its ``path(s)`` picks from
    paths: tuple[str, ...] = ("readable",)

    def forced_path(self, s: ParamStep) -> str | None:
        """``force_path`` for a projected step (None when unset), refused unless it is one of :attr:`paths`."""
        if self.force_path is None or s.P is None:
            return None
        if self.force_path not in self.paths:
            raise ValueError(f"force_path={self.force_path!r}: {type(self).__name__} computes by {self.paths}")
        return self.force_path

    def update(self, s: ParamStep) -> None:  # pragma: no cover - abstract
        """The optimizer's update rule for one parameter (``s.P`` None: a full-rank parameter)."""
        raise NotImplementedError

    def _refresh(self, projector: Projector, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
        had = projector.initialized
        policy = group["moment_policy"]
        old = projector.matrix() if (had and policy == "rotate") else None
        ok = projector.refresh(grad, state["step"])
        if ok and had:
            if policy == "reset":
                self._reset_moments(state)
            elif policy == "rotate":
                self._rotate_moments(state, projector.transition(old), state["proj_right"])
        return ok

    def _reset_moments(self, state: dict[str, Any]) -> None:
        for key in self.moment_keys:
            if key in state:
                state[key].zero_()

    def _rotate_moments(self, state: dict[str, Any], T: torch.Tensor, right: bool) -> None:
        """m <- m T (right) / T m (left); v <- |v T| (the DCT-AdamW heuristic keeps v non-negative)."""
        for key in self.moment_keys:
            if key not in state:
                continue
            x = state[key].float()
            y = x @ T if right else T @ x
            if key == "exp_avg_sq":
                y = y.abs()
            state[key].copy_(y)

    # ---- helpers shared by the Adam family --------------------------------------------------------------------
    def shared_state_tensors(self) -> list[torch.Tensor]:
        """Tensors the optimizer keeps alive outside ``self.state`` (e.g. shared DCT bases)."""
        out = []
        for group in self.param_groups:
            if group.get("rank") is None or group["projector"] != "dct":
                continue
            for p in group["params"]:
                st = self.state.get(p, {})
                if "proj_indices" in st:
                    out.append(shared_dct_basis(st["proj_dim"], st["proj_dtype_ref"].dtype, st["proj_indices"].device))
        return out
