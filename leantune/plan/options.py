"""What ``leantune plan`` accepts: the ``name:key=value`` specs of adapters and optimizers, the memory options, and
the refusals of what cannot be built (checked before anything is planned)."""

from __future__ import annotations

import dataclasses
from typing import Any

from leantune.optim import OPTIMIZERS, OptimizerConfig, QuZOConfig
from leantune.optim.config import optimizer_options
from leantune.optim.sharded import ROW_SHARDABLE_PROJECTORS
from leantune.patching.budget import parse_budget

MEMORY_OPTIONS = ("none", "checkpointing", "leantune", "leantune+checkpointing", "leantune+chunked_loss",
                  "leantune+checkpointing+chunked_loss")
#: ``+budget:X`` may end any option without checkpointing (``budget:25%`` alone = leantune's techniques + the budget)
BUDGET_EXAMPLES = ("budget:25%", "leantune+chunked_loss+budget:0.5", "none+budget:6GB")

def parse_spec(spec: str | None) -> tuple[str | None, dict[str, Any]]:
    """``"name:key=value,key=value"`` → ``(name, {key: value})`` with ints, floats, bools, null and lists (a|b)
    parsed.

    >>> parse_spec("galore_adamw8bit:rank=1024,layerwise=true")
    ('galore_adamw8bit', {'rank': 1024, 'layerwise': True})
    >>> parse_spec("lora:r=16,target_modules=q_proj|v_proj,lora_alpha=32.0")
    ('lora', {'r': 16, 'target_modules': ['q_proj', 'v_proj'], 'lora_alpha': 32.0})
    >>> parse_spec("none")
    (None, {})
    """
    if spec is None or spec in ("", "none"):
        return None, {}
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: options are key=value, got {item!r}")
        options[key.strip()] = _value(value.strip())
    return name.strip(), options


def _value(text: str) -> Any:
    if "|" in text:
        return [_value(v) for v in text.split("|")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "null":  # an option's None (e.g. quzo:bits=null, MeZO's unrounded directions)
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_memory(memory: str) -> tuple[str, str | None]:
    """``(option, budget)``: one of :data:`MEMORY_OPTIONS`, optionally ending in ``+budget:X`` (``budget:X`` alone:
    leantune's techniques with the budget).

    >>> parse_memory("budget:25%")
    ('leantune', '25%')
    >>> parse_memory("leantune+chunked_loss+budget:6GB")
    ('leantune+chunked_loss', '6GB')
    """
    name, _, budget = memory.partition("budget:")
    name = name.rstrip("+") or "leantune"
    if name not in MEMORY_OPTIONS or (memory.count("budget:") and not budget) or memory.count("budget:") > 1:
        raise ValueError(f"memory must be one of {MEMORY_OPTIONS}, optionally ending in +budget:X (e.g. "
                         f"{', '.join(BUDGET_EXAMPLES)}), got {memory!r}")
    if budget and "checkpointing" in name:
        raise ValueError(f"memory {memory!r}: the budget policy checkpoints layers itself; drop 'checkpointing'")
    if budget:
        parse_budget(_budget_value(budget))
    return name, (budget or None)


def _budget_value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _check_optimizer_options(name: str, options: dict[str, Any]) -> None:
    """Refuse an unknown optimizer, an option it does not have, or a value ``OptimizerConfig`` refuses."""
    if name in ("adamw", "adamw8bit"):
        if set(options) - {"layerwise"}:
            raise ValueError(f"optimizer {name!r} takes no options here (got {sorted(options)})")
        return
    if name == "quzo":
        try:
            QuZOConfig(**options)
        except TypeError:
            fields = sorted(f.name for f in dataclasses.fields(QuZOConfig))
            raise ValueError(f"optimizer 'quzo' has no option(s) {sorted(set(options) - set(fields))}; its options: "
                             f"{fields}") from None
        return
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose adamw, adamw8bit, quzo or one of {sorted(OPTIMIZERS)}")
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)} - {"name", "optimizer_kwargs"}
    own = set(optimizer_options(OPTIMIZERS[name].cls)) | ({"int8_weights"} if OPTIMIZERS[name].int8_weights else set())
    unknown = sorted(set(options) - fields - own)
    if unknown:
        raise ValueError(f"optimizer {name!r} has no option(s) {unknown}; its options: {sorted(fields | own)}")
    try:
        OptimizerConfig(name, **{k: v for k, v in options.items() if k in fields},
                        optimizer_kwargs={k: v for k, v in options.items() if k not in fields})
    except TypeError as err:
        raise ValueError(f"optimizer {name!r}: {err}") from None


def _check_fsdp(name: str | None, options: dict[str, Any], layerwise: bool) -> None:
    """What ``sharded.check_sharded_optimizer`` refuses at construction, refused here too (no plan for it)."""
    if name not in OPTIMIZERS:
        return
    spec = OPTIMIZERS[name]
    projector = options.get("projector", spec.projector)
    if not spec.cls.row_shardable or projector not in ROW_SHARDABLE_PROJECTORS:
        raise ValueError(f"{name} (projector {projector}) does not run under FSDP2: its update needs statistics across "
                         "all rows of the projected gradient; use one of " +
                         ", ".join(n for n, s in OPTIMIZERS.items() if s.row_shardable) + " with --fsdp")
    if layerwise:
        raise ValueError("layerwise=true does not run under FSDP2 (per-layer updates run before FSDP2's "
                         "reduce-scatter); drop it with --fsdp, or plan DDP (no --fsdp)")
    if options.get("shard_replicated") and not spec.cls.replicated_shardable:
        raise ValueError(f"{name} does not support shard_replicated=true; use galore_adamw or dct_adamw with it")
