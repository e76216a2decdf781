"""Optimizer checkpoints that survive faults: written atomically, read with one named error.

``save_optimizer(optimizer, path)`` writes ``torch.save(optimizer.state_dict())`` to a temporary file beside ``path``
and renames it into place (a killed process leaves the previous file). ``load_optimizer(optimizer, path)`` reads it
with ``weights_only=True`` (tensors and plain values only) and loads it; a truncated or unreadable file raises a
``LeanTuneError``, a state that does not fit (another optimizer, rank or model; NaN/inf) the ``ValueError`` of
:meth:`LowRankOptimizer.load_state_dict`, and in every case the optimizer is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from leantune._utils import LeanTuneError
from leantune.optim.sharded import local, row_shard
from leantune.optim.sharded_state import localize


def save_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(optimizer.state_dict(), f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError) as err:  # truncated zip, bad pickle, missing file
        raise LeanTuneError(f"cannot read the optimizer checkpoint {str(path)!r}: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise LeanTuneError(f"{str(path)!r} is not an optimizer checkpoint (no state / param_groups)")
    optimizer.load_state_dict(state)


class StateLoadingMixin:
    """``load_state_dict`` of leantune's optimizers: a checkpoint is checked before anything changes (another
    optimizer, rank or model, NaN/inf state: one ``ValueError`` naming it) and state tensors keep their saved dtype."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, except that every state tensor keeps its saved dtype.

        torch casts each floating-parameter's state tensors to the parameter's dtype; for a bf16 model that would
        round fp32 absmax and norms to bf16 and turn int32 DCT indices into bf16 (corrupting them above 256). The
        saved tensors themselves are put back instead (moved to the parameter's device), so resuming is exact.
        Under FSDP2 the state may come as DTensors or whole rows (``sharded_state.py``): this rank keeps its rows.
        """
        state_dict = localize(self, state_dict)
        saved = state_dict["state"]
        # the layout each state tensor has now (e.g. after DSD's zero-gradient init step): loaded values are put back
        # in it, so the resumed GEMMs read them as the uninterrupted run did (CPU GEMM rounding depends on layout)
        layouts = {(id(p), k): (tuple(v.shape), v.stride()) for p, st in self.state.items() for k, v in st.items()
                   if isinstance(v, torch.Tensor) and v.layout == torch.strided}
        self._check_loaded_state(state_dict)  # before anything changes: a bad checkpoint leaves the optimizer as it was
        # how the state is laid out over the ranks is this optimizer's choice, not a hyper-parameter to restore
        layout = [g.get("shard_replicated") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, divided in zip(self.param_groups, layout):
            if divided is not None:
                group["shard_replicated"] = divided
        for group in self.param_groups:  # an option added after the checkpoint was written takes today's value
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(pid, {}).items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        value = value.to(device=p.device, copy=True)
                        shape, stride = layouts.get((id(p), key), (None, None))
                        if shape == tuple(value.shape) and stride != value.stride():
                            value = torch.empty_strided(shape, stride, dtype=value.dtype,
                                                        device=value.device).copy_(value)
                        self.state[p][key] = value

    def _check_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """Name what makes ``state_dict`` unusable for this optimizer and these parameters (``ValueError``)."""
        name = type(self).__name__
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict) or len(groups) != len(
                self.param_groups) or any(len(g.get("params", ())) != len(o["params"])
                                          for g, o in zip(groups, self.param_groups)):
            raise ValueError(f"{name}.load_state_dict: the checkpoint's parameter groups do not match this optimizer's "
                             "(another model, target list or optimizer?)")
        known = set(self.state_keys)
        for saved_group, group in zip(groups, self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                state = state_dict["state"].get(pid, {})
                unknown = sorted(set(state) - known)
                if unknown:
                    raise ValueError(f"{name}.load_state_dict: state keys {unknown} of parameter {pid} are not {name}'s "
                                     f"(it writes {sorted(known)}): the checkpoint is from another optimizer")
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step" and \
                            not bool(torch.isfinite(value).all()):
                        raise ValueError(f"{name}.load_state_dict: {key} of parameter {pid} holds NaN/inf")
                expected = self._moment_shape(p, {**saved_group, "shard_replicated": group.get("shard_replicated")},
                                              state)
                for key in ("exp_avg", "exp_avg_sq", "state1", "state2"):
                    value = state.get(key)
                    if isinstance(value, torch.Tensor) and expected is not None and tuple(value.shape) != expected:
                        raise ValueError(f"{name}.load_state_dict: {key} of parameter {pid} has shape "
                                         f"{tuple(value.shape)}, this parameter ({tuple(p.shape)}) needs {expected}: "
                                         "the checkpoint is from another model or rank")
                indices = state.get("proj_indices")
                if isinstance(indices, torch.Tensor) and indices.numel() and (
                        indices.is_floating_point() or int(indices.min()) < 0 or int(indices.max()) >= state["proj_dim"]):
                    raise ValueError(f"{name}.load_state_dict: proj_indices of parameter {pid} are outside [0, "
                                     f"{state.get('proj_dim')})")

    def _moment_shape(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> tuple[int, ...] | None:
        """The shape of the Adam moments of ``p``: the projected gradient's (None when it cannot be told)."""
        rows = tuple(local(p).shape)  # an FSDP2 parameter's state covers this rank's rows
        if group.get("rank") is None or p.ndim != 2:
            return rows
        if "proj_right" not in state:
            return None
        m, n = p.shape
        rank = min(int(group["rank"]), m, n)
        if group.get("projector") == "svd2":
            return (rank, rank)
        if state["proj_right"]:
            return (rows[0], rank)
        shard = row_shard(p) if group.get("shard_replicated") else None  # divided columns (sharded.py)
        return (rank, shard.chunk(n)[1]) if shard is not None else (rank, n)
