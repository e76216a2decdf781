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

import torch

from leantune._utils import LeanTuneError


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
