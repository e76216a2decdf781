"""``ParamStep``: what one parameter's update reads, by name — the update rules and their fast paths take this one
object instead of positional (p, grad, R, N, state, group, projector, step_size) arguments, and the FSDP2 shard
context travels in it explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from leantune.optim.projectors import Projector
from leantune.optim.sharded import RowShard


@dataclass
class ParamStep:
    """One parameter's update.

    Attributes:
        W: the weight, updated in place (this rank's rows of an FSDP2 parameter).
        G: its gradient as the rule sees it (per-parameter clipping and the rule's working dtype applied).
        state: the parameter's optimizer state.
        group: its param group (hyper-parameters; the learning rate already scaled by a restart's recovery).
        P: the projector (None: a full-rank parameter, plain Adam).
        shard: this rank's rows under FSDP2 (None: a whole tensor); reductions over rows go through it.
        R: the projected gradient R = project(G), once computed (G itself for a full-rank parameter).
        N: the normalised direction, once computed.
        step_size: η_t of this step, once computed.
    """

    W: torch.Tensor
    G: torch.Tensor
    state: dict[str, Any]
    group: dict[str, Any]
    P: Projector | None = None
    shard: RowShard | None = None
    R: torch.Tensor | None = None
    N: torch.Tensor | None = None
    step_size: float = 0.0
