"""One patcher for ``leantune.memory`` (what is saved) and ``leantune.kernels`` (how it is computed).

``configure(model, memory=..., kernels=...)`` is the only function that changes a model; its two views sit side by side
here — :mod:`.memory_view` (``leantune.memory.apply`` / ``restore``) and :mod:`.kernels_view`
(``leantune.kernels.apply`` / ``restore``) — and :mod:`.options` holds both views' options (``MemoryConfig``, the
kernel names). See :mod:`.patcher` for which patch wins on each site, and
:mod:`leantune.architectures` for the per-architecture table it reads.
"""

from . import kernels_view, memory_view
from .options import ALL_KERNELS, APPROXIMATE_KERNELS, EXACT_KERNELS, MemoryConfig
from .patcher import KERNEL_NAMES, UNCHANGED, configure, describe, restore_all
from .sites import LowRankAdapter, Sites, activation_kind, find_sites
from .state import PatchState, SharingWarning, state_of

__all__ = ["ALL_KERNELS", "APPROXIMATE_KERNELS", "EXACT_KERNELS", "KERNEL_NAMES", "LowRankAdapter", "MemoryConfig",
           "UNCHANGED", "PatchState", "SharingWarning", "Sites", "activation_kind", "configure", "describe",
           "find_sites", "kernels_view", "memory_view", "restore_all", "state_of"]
