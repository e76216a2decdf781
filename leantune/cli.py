"""The ``leantune`` command line (the top floor: it may import every package); each subcommand calls the function a
notebook user would call.

    leantune merge   --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR   -> leantune.merge_to_directory
    leantune export  ADAPTER_DIR --to lora OUT_DIR [--base MODEL_DIR]     -> leantune.export_to_lora
    leantune export  ADAPTER_DIR --to quantized OUT_DIR [--base MODEL_DIR] -> leantune.export_quantized (L4Q)
    leantune inspect ADAPTER_DIR [--json]                                  -> leantune.inspect_adapter
    leantune compress ADAPTER_DIR OUT_DIR --density 0.1 [--scale auto]     -> leantune.compress_adapter
    leantune compress --full BASE_DIR TUNED_DIR OUT_DIR --density 0.1      -> leantune.compress.compress_full
    leantune plan MODEL [--seq --batch --adapter --optimizer --memory --quant --gpu --search]  -> leantune.plan
    leantune profile ...                                                   -> leantune.memory.profile

User errors (bad paths, wrong files, mismatched bases) print one line ``leantune: error: …`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # leantune never downloads; paths are local folders (before the hub loads)

from leantune._io import verify_adapter_files  # noqa: E402
from leantune._notices import quiet_command_line  # noqa: E402
from leantune._utils import LeanTuneError  # noqa: E402
from leantune.compress import compress_adapter, compress_full  # noqa: E402
from leantune.integrations.interop import export_to_lora, inspect_adapter, merge_to_directory  # noqa: E402
from leantune.integrations.quantized_export import export_quantized  # noqa: E402
from leantune.memory.cli import add_profile_subcommand  # noqa: E402
from leantune.plan.cli import add_plan_subcommand  # noqa: E402


def _print_inspect(info: dict) -> None:
    rows = [
        ("method", info["method"]),
        ("base model", info["base_model"] or "(not recorded)"),
        ("task type", info["task_type"] or "-"),
        ("target modules", info["target_modules"]),
        ("adapted modules", info["adapted_modules"]),
        ("rank", info["rank"] if info["rank"] is not None else "-"),
        ("trainable adapter parameters", f"{info['trainable_adapter_parameters']:,}"),
        ("frozen adapter parameters", f"{info['frozen_adapter_parameters']:,}"),
        ("modules_to_save parameters", f"{info['modules_to_save_parameters']:,}"),
    ]
    packed = info.get("compression")
    if packed:
        rows += [
            ("ComPEFT", f"density {packed['density']}, scale {packed['alpha']}, {packed['scope']} scope, "
                        f"{packed['encoding']} positions"),
            ("compressed update", f"{packed['original_bytes'] / 2**20:.3f} MiB -> {packed['stored_bytes'] / 2**20:.3f} "
                                  f"MiB ({packed['ratio']:.1f}x; {packed['ratio_vs_fp16']:.1f}x vs fp16)"),
            ("kept exactly", f"{len(packed['kept_tensors'])} tensors, {packed['kept_bytes'] / 2**20:.3f} MiB"),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``leantune: error:`` line (exit 2), not a usage block."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"leantune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="leantune", description="Merge, export and inspect leantune adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="write a full model folder with the adapter merged into the weights")
    merge.add_argument("--base", required=True, help="base model folder (config.json + safetensors)")
    merge.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + safetensors)")
    merge.add_argument("--out", required=True, help="output folder (created; must be empty)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    export = sub.add_parser("export", help="convert a low-rank leantune adapter into a plain peft LoRA adapter (--to "
                            "lora), or an L4Q adapter into its served integer model (--to quantized)")
    export.add_argument("adapter", help="adapter folder")
    export.add_argument("--to", required=True, choices=["lora", "quantized"],
                        help="lora: a plain peft LoRA adapter; quantized: a transformers folder with torchao int weights")
    export.add_argument("out", help="output folder")
    export.add_argument("--base", default=None, help="base model folder (default: the one recorded in the adapter)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    inspect = sub.add_parser("inspect", help="print method, targets, ranks and parameter counts of an adapter")
    inspect.add_argument("adapter", help="adapter folder")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    compress = sub.add_parser("compress", help="ComPEFT: sparsify + ternarize an adapter (or a full fine-tuning delta)")
    compress.add_argument("paths", nargs="+", metavar="DIR",
                          help="ADAPTER_DIR OUT_DIR, or OUT_DIR alone with --full BASE_DIR TUNED_DIR")
    compress.add_argument("--full", nargs=2, metavar=("BASE_DIR", "TUNED_DIR"), help="compress tuned - base")
    compress.add_argument("--density", type=float, default=0.1, help="fraction of entries kept (default 0.1)")
    compress.add_argument("--scale", default="auto", help="alpha: a number, or 'auto' (default)")
    compress.add_argument("--scope", choices=["tensor", "global"], default="tensor")
    compress.add_argument("--encoding", choices=["golomb", "bitmask"], default="golomb")
    compress.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    add_plan_subcommand(sub)
    add_profile_subcommand(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_command_line()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            out = merge_to_directory(args.base, args.adapter, args.out, overwrite=args.overwrite)
            print(f"merged model written to {out}")
        elif args.command == "export" and args.to == "quantized":
            base = args.base or verify_adapter_files(args.adapter).base_model_name_or_path
            if not base:
                raise LeanTuneError("the adapter does not record its base model; pass --base MODEL_DIR")
            out = export_quantized(base, args.adapter, args.out, overwrite=args.overwrite)
            print(f"quantized model (torchao int weights, loads with from_pretrained) written to {out}")
        elif args.command == "export":
            out = export_to_lora(args.adapter, args.out, base_dir=args.base, overwrite=args.overwrite)
            print(f"plain peft LoRA adapter written to {out}")
        elif args.command == "inspect":
            info = inspect_adapter(args.adapter)
            if args.json:
                print(json.dumps(info, indent=2, default=str))
            else:
                _print_inspect(info)
        elif args.command == "compress":
            try:
                alpha = args.scale if args.scale == "auto" else float(args.scale)
            except ValueError:
                raise LeanTuneError(f"--scale must be 'auto' or a number, got {args.scale!r}") from None
            options = dict(density=args.density, alpha=alpha, scope=args.scope, encoding=args.encoding,
                           overwrite=args.overwrite)
            if args.full:
                if len(args.paths) != 1:
                    raise LeanTuneError("with --full BASE_DIR TUNED_DIR give one OUT_DIR")
                info = compress_full(*args.full, args.paths[0], **options)
            else:
                if len(args.paths) != 2:
                    raise LeanTuneError("give ADAPTER_DIR OUT_DIR (or --full BASE_DIR TUNED_DIR OUT_DIR)")
                info = compress_adapter(*args.paths, **options)
            print(f"compressed {info['compressed_elements']:,} numbers to {info['stored_bytes'] / 2**20:.3f} MiB "
                  f"({info['ratio']:.1f}x; {info['ratio_vs_fp16']:.1f}x vs fp16), kept {len(info['kept_tensors'])} "
                  f"tensors exactly; written to {args.paths[-1]}")
        elif hasattr(args, "func"):  # subcommands registered by other packages (leantune profile)
            return int(args.func(args) or 0)
    except LeanTuneError as err:
        print(f"leantune: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # what the file system refused (a read-only or full output location, a vanished file)
        where = f" {err.filename}" if err.filename else ""
        print(f"leantune: error: cannot access{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
