"""``leantune profile MODEL_DIR_OR_CONFIG``: one training step, where its memory goes, with/without leantune.memory.

Hook into a CLI with ``add_profile_subcommand(subparsers)``; the handler is ``run_profile(args)``.
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from leantune._utils import LeanTuneError
from leantune.patching.memory_view import apply, enable_checkpointing
from leantune.patching.options import MemoryConfig

from .profiler import profile

TECHNIQUES = ("ms_norms", "approx_activations", "fused_gated_mlp", "velora", "chunked_loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_profile_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``profile`` on an ``argparse`` subparsers object; sets ``func=run_profile``."""
    parser = subparsers.add_parser(
        "profile", help="profile the memory of one training step (saved activations per module kind, params, "
                        "grads, optimizer state), optionally with leantune.memory techniques")
    parser.add_argument("model", help="model directory with weights, or a config.json / directory holding only one")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lora-rank", type=int, default=8, help="peft LoRA on all linear layers (0: none)")
    parser.add_argument("--memory", default="none",
                        help="comma-separated techniques to apply: " + ", ".join(TECHNIQUES) + ", or all / none; "
                             "add budget:X for an activation budget (budget:25%%, budget:2GB) or layers:MODE "
                             "(layers:checkpoint): the table then shows what each layer does")
    parser.add_argument("--compare", action="store_true", help="also profile without techniques and print both")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.set_defaults(func=run_profile)
    return parser


def memory_config_from_string(spec: str) -> MemoryConfig | None:
    """"all" / "none" / "ms_norms,fused_gated_mlp" -> MemoryConfig (None for "none"); ``budget:X`` and
    ``layers:MODE`` items add an activation budget or one mode for every layer.

    >>> memory_config_from_string("fused_gated_mlp,budget:25%").budget
    '25%'
    >>> memory_config_from_string("layers:checkpoint").layer_modes
    ('checkpoint',)
    """
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return None
    items = [s.strip() for s in spec.split(",") if s.strip()]
    extra: dict = {}
    for item in [i for i in items if i.startswith(("budget:", "layers:"))]:
        items.remove(item)
        key, _, value = item.partition(":")
        if key == "budget":
            try:
                extra["budget"] = float(value)
            except ValueError:
                extra["budget"] = value
        else:
            extra["layer_modes"] = value
    if items in ([], ["none"]):
        return MemoryConfig.none(**extra)
    if items == ["all"]:
        return MemoryConfig.all(**extra)
    chosen = set(items)
    unknown = chosen - set(TECHNIQUES)
    if unknown:
        raise ValueError(f"--memory: unknown technique(s) {sorted(unknown)}; choose from {', '.join(TECHNIQUES)}, "
                         f"budget:X or layers:MODE")
    return MemoryConfig(**{t: t in chosen for t in TECHNIQUES}, **extra)


def load_model(path: str, dtype: torch.dtype) -> nn.Module:
    """Weights if ``path`` holds them (AutoModelForCausalLM, else AutoModel), else a random model from the config."""
    has_weights = os.path.isdir(path) and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    config = AutoConfig.from_pretrained(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    for cls in (AutoModelForCausalLM, AutoModel):
        try:
            if has_weights:
                return cls.from_pretrained(path, dtype=dtype)
            return cls.from_config(config, dtype=dtype)
        except ValueError:
            continue
    raise ValueError(f"cannot build a model from {path!r}")


def make_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict:
    """Random inputs of the right kind (pixel_values for vision configs, token ids with labels otherwise)."""
    config = model.config
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = config.image_size
        return {"pixel_values": torch.randn(batch_size, config.num_channels, size, size, dtype=model.dtype)}
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    batch = {"input_ids": ids}
    if type(model).__name__.endswith("ForCausalLM"):
        batch["labels"] = ids.clone()
    if getattr(config, "is_encoder_decoder", False):
        batch["labels"] = ids.clone()
    return batch


def _prepare(args: argparse.Namespace, config: MemoryConfig | None) -> nn.Module:
    try:
        model = load_model(args.model, DTYPES[args.dtype])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # no or a corrupt config / weights
        raise LeanTuneError(f"cannot build a model from {args.model!r}: {str(err).strip().splitlines()[0]}") from None
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    if args.lora_rank > 0:
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules="all-linear"), autocast_adapter_dtype=False)
    model.train()
    if config is not None:
        print(apply(model, config))
    return model


def run_profile(args: argparse.Namespace) -> int:
    """Handler of ``leantune profile``: prints one markdown table per run (bad input: :class:`LeanTuneError`)."""
    for name, least in (("batch_size", 1), ("seq_len", 1), ("lora_rank", 0)):
        if getattr(args, name) < least:
            raise LeanTuneError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    try:
        config = memory_config_from_string(args.memory)
    except ValueError as err:
        raise LeanTuneError(str(err)) from None
    runs = [("eager", None), ("leantune.memory", config)] if args.compare and config else [(args.memory, config)]
    for label, run_config in runs:
        torch.manual_seed(0)
        model = _prepare(args, run_config)
        batch = make_batch(model, args.batch_size, args.seq_len)
        print(f"\n### {label}\n")
        print(profile(model, batch))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m leantune.memory.cli profile ...``)."""
    parser = argparse.ArgumentParser(prog="leantune")
    add_profile_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
