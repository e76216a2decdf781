"""leantune: fine-tuning that fits — extra peft adapters, low-rank gradient optimizers, memory-saving
backprop and fused Triton kernels for Hugging Face ``transformers`` + ``peft``.

Importing ``leantune`` registers its adapter types with peft, so ``get_peft_model`` and
``PeftModel.from_pretrained`` accept them. The optimizer, memory and kernel packages load on first use:
``leantune.optim``, ``leantune.memory``, ``leantune.kernels``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._notices import drop_optional_kernel_notices

drop_optional_kernel_notices()  # before peft imports bitsandbytes (see _notices.py)

from . import kernels as _kernels  # noqa: E402
from ._utils import LeanTuneError  # noqa: E402
from .adapters import (  # noqa: E402
    ALLoRAConfig,
    BottleneckConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DyLoRAConfig,
    L4QConfig,
    LoraSBConfig,
    LoraXSConfig,
    LostConfig,
    NolaConfig,
    SLTrainConfig,
    count_trainable,
    estimate_first_step,
    get_lora_sb_model,
)
from .compress import compress_adapter, decompress_adapter  # noqa: E402
from .integrations.callback import LeanTuneCallback  # noqa: E402
from .integrations.checkpoints import load_adapter, save_adapter  # noqa: E402
from .integrations.fsdp import shard_model  # noqa: E402
from .integrations.interop import export_to_lora, inspect_adapter, merge_to_directory  # noqa: E402
from .integrations.quantized_export import export_quantized  # noqa: E402
from .patching import kernels_view as _kernels_view  # noqa: E402

# ``leantune.kernels.apply / restore / patched_modules`` and the kernel names are the kernels view of the one patcher.
# The ops package sits below the patcher (ARCHITECTURE.md), so the view is attached here, at the top, instead of the ops
# package importing upwards.
for _name in ("apply", "restore", "patched_modules", "ALL_KERNELS", "EXACT_KERNELS", "APPROXIMATE_KERNELS"):
    setattr(_kernels, _name, getattr(_kernels_view, _name))
_kernels.__all__ = sorted({*_kernels.__all__, "apply", "restore", "patched_modules", "ALL_KERNELS", "EXACT_KERNELS",
                           "APPROXIMATE_KERNELS"})
del _name

__version__ = "0.1.0"

__all__ = [
    "compress_adapter",
    "decompress_adapter",
    "ALLoRAConfig",
    "BottleneckConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "DyLoRAConfig",
    "L4QConfig",
    "NolaConfig",
    "count_trainable",
    "LeanTuneCallback",
    "LeanTuneError",
    "LoraSBConfig",
    "LoraXSConfig",
    "LostConfig",
    "SLTrainConfig",
    "estimate_first_step",
    "export_quantized",
    "export_to_lora",
    "get_lora_sb_model",
    "inspect_adapter",
    "load_adapter",
    "merge_to_directory",
    "save_adapter",
    "shard_model",
]

_LAZY_SUBPACKAGES = ("optim", "memory", "kernels")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'leantune' has no attribute {name!r}")
