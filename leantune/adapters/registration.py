"""Register leantune's tuner types with peft.

peft's public ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so a third-party
method cannot use it. peft 0.21 does, however, look every method up through four plain dicts keyed by the
type (config class, tuner class, parameter prefix, mixed-model class) and delegates everything
method-specific (which state-dict keys to save, how to load them) to the tuner class. Adding our own
str-enum keys to those dicts is therefore enough for ``get_peft_model``, ``PeftModel.from_pretrained``,
``save_pretrained``, merging and Trainer support. This was checked against peft 0.21.x only; other
versions are refused at import time with a clear message.
"""

from __future__ import annotations

import enum

import peft
from packaging.version import Version
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))  # [min, max)


def check_peft_version(version: str = peft.__version__) -> None:
    """Raise ``ImportError`` if the installed peft is outside the range leantune is tested with."""
    low, high = SUPPORTED_PEFT
    if not (low <= Version(version) < high):
        raise ImportError(
            f"leantune needs peft>={low},<{high} (its tuner registration relies on peft 0.21's method mappings), "
            f"but peft {version} is installed. Run: pip install 'peft>={low},<{high}'"
        )


check_peft_version()


class LeanTuneType(str, enum.Enum):
    """peft type keys of leantune's methods; stored as ``peft_type`` in ``adapter_config.json``."""

    LORA_XS = "LORA_XS"
    LORA_SB = "LORA_SB"
    ALLORA = "ALLORA"
    DYLORA = "DYLORA"
    NOLA = "NOLA"
    BOTTLENECK = "BOTTLENECK"
    COMPACTER = "COMPACTER"
    SLTRAIN = "SLTRAIN"
    LOST = "LOST"
    L4Q = "L4Q"


#: THE registry of adapter names (``leantune plan --adapter NAME``, the support matrix): peft's own LoRA and every
#: leantune tuner, filled by :func:`register_tuner` — a new method registers itself here from its own module.
ADAPTERS: dict[str, type] = {"lora": peft.LoraConfig}


def register_tuner(peft_type: LeanTuneType, config_cls: type, model_cls: type,
                   variants: dict[str, type] | None = None) -> None:
    """Make ``peft_type`` known to peft (idempotent, so re-imports and reloads are harmless) and to leantune by the
    name ``peft_type.value.lower()``; ``variants``: further names for config subclasses of the same tuner."""
    prefix = model_cls.prefix
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == prefix and other_type != peft_type:
            raise KeyError(f"Parameter prefix {prefix!r} of {model_cls.__name__} is already used by {other_type}.")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    ADAPTERS[peft_type.value.lower()] = config_cls
    ADAPTERS.update(variants or {})
