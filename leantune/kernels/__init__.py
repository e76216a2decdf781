"""How leantune's ops are computed: one autograd function per op, each beside its torch reference and its Triton
kernels, choosing the backend by one rule (:mod:`.dispatch`: Triton on CUDA, C loops or torch on CPU).

One file per op — ``activations`` (ReGELU2/ReSiLU2), ``norms`` (MS-RMSNorm/MS-LN, incl. the post-norm variant),
``gated_mlp`` (SwiGLU/GeGLU elementwise), ``fused_mlp`` (whole gated MLP with LoRA projections), ``lora_linear``
(fused adapter linear), ``optimizer_step`` (fused low-rank Adam step), ``int8_linear`` (INT8-weight linear) with
``quantize`` (blockwise INT8/INT4, stochastic rounding) — plus ``cpu_native`` (the C loops) and
the public ``leantune.kernels.apply(model)`` / ``restore(model)`` / ``patched_modules(model)`` and the kernel names,
which are the kernels view of the one patcher (:mod:`leantune.patching.kernels_view`; the patcher sits above the ops,
so ``leantune/__init__.py`` attaches the view here).
"""

from .activations import (
                          ApproxActivation,
                          ApproxActivationFunction,
                          pack_2bit,
                          reference_regelu2,
                          reference_resilu2,
                          regelu2,
                          resilu2,
                          unpack_2bit,
)
from .dispatch import (
                          force_triton,
                          interpreter_active,
                          kernel_for,
                          register_kernel,
                          registered_kernels,
                          set_enabled,
                          triton_available,
)
from .fused_mlp import GatedMLPFunction, GatedMLPSpec, fused_gated_mlp
from .gated_mlp import gated_activation, reference_gated_mlp, reference_gated_mlp_backward
from .lora_linear import fused_lora_linear, reference_lora_linear
from .norms import (
                          MSNormFunction,
                          ms_layernorm,
                          ms_norm,
                          ms_norm_affine,
                          ms_rmsnorm,
                          reference_ms_layernorm,
                          reference_ms_rmsnorm,
)
from .optimizer_step import fused_galore_adam_step, reference_galore_adam_step
from .velora import VeLoRAFunction, VeLoRAProjection

__all__ = [
    "ApproxActivation",
    "GatedMLPSpec",
    "VeLoRAFunction",
    "VeLoRAProjection",
    "pack_2bit",
    "unpack_2bit",
    "ALL_KERNELS",
    "APPROXIMATE_KERNELS",
    "ApproxActivationFunction",
    "EXACT_KERNELS",
    "GatedMLPFunction",
    "MSNormFunction",
    "apply",
    "force_triton",
    "fused_galore_adam_step",
    "fused_gated_mlp",
    "fused_lora_linear",
    "gated_activation",
    "interpreter_active",
    "kernel_for",
    "ms_layernorm",
    "ms_norm",
    "ms_norm_affine",
    "ms_rmsnorm",
    "patched_modules",
    "reference_galore_adam_step",
    "reference_gated_mlp",
    "reference_gated_mlp_backward",
    "reference_lora_linear",
    "reference_ms_layernorm",
    "reference_ms_rmsnorm",
    "reference_regelu2",
    "reference_resilu2",
    "regelu2",
    "register_kernel",
    "registered_kernels",
    "restore",
    "resilu2",
    "set_enabled",
    "triton_available",
]
