"""Fused Triton kernels, each beside its plain-torch reference (see ``dispatch`` for when each is used).

One file per kernel family — ``activations`` (ReGELU2/ReSiLU2), ``norms`` (MS-RMSNorm/MS-LN), ``gated_mlp``
(SwiGLU/GeGLU elementwise), ``fused_mlp`` (whole gated MLP for ``leantune.memory``), ``lora_linear`` (fused adapter
linear), ``optimizer_step`` (fused low-rank Adam) — ``cpu_native`` (C loops for the CPU paths of the 2-bit
activations and the MS-norm backward, compiled on first use), and ``patching`` to switch them on for a model:
``leantune.kernels.apply(model)`` / ``leantune.kernels.restore(model)``.
"""

from .activations import regelu2, reference_regelu2, reference_resilu2, resilu2
from .dispatch import (
    force_triton,
    interpreter_active,
    kernel_for,
    register_kernel,
    registered_kernels,
    set_enabled,
    triton_available,
)
from . import fused_mlp  # noqa: F401  (registers the whole-MLP "gated_mlp" kernel)
from .gated_mlp import gated_activation, reference_gated_mlp, reference_gated_mlp_backward
from .lora_linear import fused_lora_linear, reference_lora_linear
from .norms import ms_layernorm, ms_rmsnorm, reference_ms_layernorm, reference_ms_rmsnorm
from .optimizer_step import BlockwiseInt8State, fused_galore_adam_step, reference_galore_adam_step
from .patching import ALL_KERNELS, APPROXIMATE_KERNELS, EXACT_KERNELS, apply, patched_modules, restore

__all__ = [
    "ALL_KERNELS",
    "APPROXIMATE_KERNELS",
    "BlockwiseInt8State",
    "EXACT_KERNELS",
    "apply",
    "force_triton",
    "fused_galore_adam_step",
    "fused_lora_linear",
    "gated_activation",
    "interpreter_active",
    "kernel_for",
    "ms_layernorm",
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
