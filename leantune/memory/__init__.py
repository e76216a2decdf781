"""Memory-saving backprop — what is saved for backward: memory-sharing norms (affine folded into the next linears),
2-bit activation backward, the fused gated MLP, VeLoRA, a saved-tensor profiler.

The ops themselves live in :mod:`leantune.kernels` (one autograd function each, choosing Triton / C / torch; their
one public door); this package decides what a model saves and patches it through the one patcher
(:mod:`leantune.patching`)::

    handle = leantune.memory.apply(model, leantune.memory.MemoryConfig())   # after adapters are injected
    print(leantune.memory.profile(model, batch))                           # where the memory goes
    handle.undo()                                                          # or leantune.memory.restore(model)
"""

from leantune.patching.folding import save_unfolded_adapter, unfold_delta
from leantune.patching.memory_view import (
                                           SUPPORTED_MODEL_TYPES,
                                           MemoryHandle,
                                           SharingWarning,
                                           apply,
                                           enable_checkpointing,
                                           restore,
)
from leantune.patching.options import MemoryConfig

from .profiler import CATEGORIES, MemoryProfile, profile

__all__ = [
    "CATEGORIES", "MemoryConfig", "MemoryHandle", "MemoryProfile", "SUPPORTED_MODEL_TYPES", "SharingWarning", "apply",
    "enable_checkpointing", "profile", "restore", "save_unfolded_adapter", "unfold_delta",
]
