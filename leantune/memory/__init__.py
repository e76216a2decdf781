"""Memory-saving backprop — what is saved for backward: memory-sharing norms (affine folded into the next linears),
2-bit activation backward, the fused gated MLP, VeLoRA, a saved-tensor profiler.

The ops themselves live in :mod:`leantune.kernels` (one autograd function each, choosing Triton / C / torch); this
package decides what a model saves and patches it through the one patcher (:mod:`leantune.patching`)::

    handle = leantune.memory.apply(model, leantune.memory.MemoryConfig())   # after adapters are injected
    print(leantune.memory.profile(model, batch))                           # where the memory goes
    handle.undo()                                                          # or leantune.memory.restore(model)
"""

from leantune.kernels.activations import (
    ApproxActivation,
    ApproxActivationFunction,
    pack_2bit,
    regelu2,
    resilu2,
    unpack_2bit,
)
from leantune.kernels.fused_mlp import GatedMLPFunction, GatedMLPSpec, fused_gated_mlp
from leantune.kernels.norms import MSNormFunction, ms_layernorm, ms_norm, ms_norm_affine, ms_rmsnorm
from leantune.kernels.velora import VeLoRAFunction, VeLoRAProjection
from leantune.patching.folding import save_unfolded_adapter, unfold_delta

from .config import MemoryConfig
from .patching import SUPPORTED_MODEL_TYPES, MemoryHandle, SharingWarning, apply, enable_checkpointing, restore
from .profiler import CATEGORIES, MemoryProfile, profile

__all__ = [
    "enable_checkpointing",
    "ApproxActivation", "ApproxActivationFunction", "CATEGORIES", "GatedMLPFunction", "GatedMLPSpec", "MSNormFunction",
    "MemoryConfig", "MemoryHandle", "MemoryProfile", "SUPPORTED_MODEL_TYPES", "SharingWarning", "VeLoRAFunction",
    "VeLoRAProjection", "apply", "fused_gated_mlp", "ms_layernorm", "ms_norm", "ms_norm_affine", "ms_rmsnorm",
    "pack_2bit", "profile", "regelu2", "resilu2", "restore", "save_unfolded_adapter", "unfold_delta", "unpack_2bit",
]
