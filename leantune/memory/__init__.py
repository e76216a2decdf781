"""Memory-saving backprop: approximate activation backward, memory-sharing norms, fused gated MLP, VeLoRA,
a saved-tensor profiler, and reversible patching of HF (+ peft) models.

    handle = leantune.memory.apply(model, leantune.memory.MemoryConfig())   # after adapters are injected
    print(leantune.memory.profile(model, batch))                           # where the memory goes
    handle.undo()                                                          # or leantune.memory.restore(model)
"""

from .approx_activations import (
    ApproxActivation,
    ReGELU2Function,
    ReSiLU2Function,
    pack_2bit,
    regelu2,
    resilu2,
    unpack_2bit,
)
from .architectures import SUPPORTED_MODEL_TYPES, describe
from .config import MemoryConfig
from .folding import save_unfolded_adapter, unfold_adapter_state, unfold_delta
from .gated_mlp import GatedMLPFunction, fused_gated_mlp
from .ms_norms import MSLayerNormFunction, MSRMSNormFunction, ms_layer_norm, ms_rms_norm
from .patching import MemoryHandle, SharingWarning, apply, restore
from .profiler import CATEGORIES, MemoryProfile, profile
from .velora import VeLoRAFunction, VeLoRAProjection

__all__ = [
    "ApproxActivation", "CATEGORIES", "GatedMLPFunction", "MSLayerNormFunction", "MSRMSNormFunction", "MemoryConfig",
    "MemoryHandle", "MemoryProfile", "ReGELU2Function", "ReSiLU2Function", "SUPPORTED_MODEL_TYPES", "SharingWarning",
    "VeLoRAFunction", "VeLoRAProjection", "apply", "describe", "fused_gated_mlp", "ms_layer_norm", "ms_rms_norm",
    "pack_2bit", "profile", "regelu2", "resilu2", "restore", "save_unfolded_adapter", "unfold_adapter_state",
    "unfold_delta", "unpack_2bit",
]
