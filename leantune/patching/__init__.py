"""One patcher for ``leantune.memory`` (what is saved) and ``leantune.kernels`` (how it is computed).

``configure(model, memory=..., kernels=...)`` is the only function that changes a model; ``leantune.memory.apply``
and ``leantune.kernels.apply`` are its two views. See :mod:`.patcher` for which patch wins on each site, and
:mod:`leantune.architectures` for the per-architecture table it reads.
"""

from .patcher import KERNEL_NAMES, UNCHANGED, configure, describe, restore_all
from .sites import Sites, activation_kind, find_sites
from .state import PatchState, SharingWarning, state_of

__all__ = ["KERNEL_NAMES", "UNCHANGED", "PatchState", "SharingWarning", "Sites", "activation_kind", "configure",
           "describe", "find_sites", "restore_all", "state_of"]
