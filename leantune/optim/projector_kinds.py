"""``make_projector``: the one place that maps a projector name of a param group to its class (the classes live in
:mod:`.projectors` and :mod:`.dct`; this module sits above both, so neither imports the other)."""

from __future__ import annotations

from typing import Any

from leantune.optim.dct import DCTProjector
from leantune.optim.projectors import (
    Projector,
    RandomizedSVDProjector,
    RandomProjector,
    SVDProjector,
    TwoSidedSVDProjector,
)

PROJECTOR_KINDS = ("svd", "rsvd", "dct", "random", "svd2")
#: every state key a projector may write (each class declares its own ``state_keys``; a checkpoint is checked
#: against the union, ``LowRankOptimizer.state_keys``)
PROJECTOR_STATE_KEYS: tuple[str, ...] = tuple(dict.fromkeys(
    key for cls in (SVDProjector, RandomizedSVDProjector, DCTProjector, RandomProjector, TwoSidedSVDProjector)
    for key in cls.state_keys))


def make_projector(kind: str, state: dict[str, Any], group: dict[str, Any], seed: int = 0) -> Projector:
    """Build the projector named by ``kind`` ("svd" | "rsvd" | "dct" | "random") from a param group's config
    (``seed``: the parameter's 0-based position in the optimizer; "random" starts from ``seed + 1``, as APOLLO;
    ``svd_signs``: see ``base.py``)."""
    rank, gap, scale = group["rank"], group["update_proj_gap"], group["scale"]
    signs = group.get("svd_signs") or ("lapack" if group.get("reference_adam") or group.get("reference_order")
                                       else "aligned")
    raw = signs == "lapack"  # the references' raw LAPACK signs
    if kind == "svd":
        return SVDProjector(state, rank, gap, scale, raw)
    if kind == "rsvd":
        return RandomizedSVDProjector(
            state, rank, gap, scale, group.get("rsvd_oversample", 8), group.get("rsvd_power_iters", 2), seed, raw
        )
    if kind == "dct":
        return DCTProjector(state, rank, gap, scale, norm_ord=group.get("dct_norm_ord", 1))
    if kind == "random":
        return RandomProjector(state, rank, gap, scale, seed=seed + 1)
    if kind == "svd2":
        return TwoSidedSVDProjector(state, rank, gap, scale, raw)
    raise ValueError(f"Unknown projector {kind!r}; choose one of {PROJECTOR_KINDS}.")
