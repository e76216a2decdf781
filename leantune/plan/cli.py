"""``leantune plan MODEL …``: the planner on the command line, with ``--search`` over common stacks."""

from __future__ import annotations

import argparse
import json
from typing import Any

from leantune._utils import LeanTuneError
from leantune.plan import MEMORY_OPTIONS, Plan, plan

#: rough step-time factors against a plain bf16 full fine-tuning step (rules of thumb, not measurements of your GPU):
#: checkpointing recomputes the forward (+1/3), a frozen base skips the weight-gradient GEMMs (~2/3 of the backward),
#: dequantizing 4/8-bit bases costs ~20% / ~40%, leantune's memory options ~5% (benchmarks/memory.py), low-rank
#: optimizers ~0–5% at this scale (benchmarks/optim_speed.py).
OVERHEAD = {"memory": {"none": 1.0, "leantune": 1.05, "checkpointing": 1.33, "leantune+checkpointing": 1.38,
                       # the chunked loss runs lm_head's forward once more (benchmarks/chunked_loss.py)
                       "leantune+chunked_loss": 1.07, "leantune+checkpointing+chunked_loss": 1.40},
            "quant": {None: 1.0, "8bit": 1.4, "4bit": 1.2}, "adapter": 0.75, "low_rank_optimizer": 1.05}


def add_plan_subcommand(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU memory of a training job (nothing is allocated)")
    p.add_argument("model", help="model folder, config.json, or a preset (llama-2-7b, llama-3-8b, mistral-7b, …)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--adapter", default=None, help="e.g. lora:r=16 or lora_xs:r=32,target_modules=q_proj|v_proj")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, or a leantune optimizer with options, "
                                                        "e.g. galore_adamw8bit:rank=1024,layerwise=true")
    p.add_argument("--memory", default="none",
                   help=f"memory option ({', '.join(MEMORY_OPTIONS)}), optionally ending in +budget:X for an "
                        f"activation budget (e.g. budget:25%%, leantune+chunked_loss+budget:6GB), or 'all' for one "
                        f"column per option")
    p.add_argument("--quant", default=None, choices=["4bit", "8bit"], help="bitsandbytes base (with an adapter)")
    p.add_argument("--gpu", default=None, help="memory per GPU, e.g. 24GB")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--fsdp", action="store_true", help="FSDP: shard weights, gradients and optimizer state")
    p.add_argument("--offload-optimizer", action="store_true",
                   help="keep the leantune optimizer's state in host memory between updates (OptimizerConfig("
                        "offload='cpu'))")
    p.add_argument("--json", action="store_true", help="the numbers as JSON (bytes)")
    p.add_argument("--search", action="store_true", help="list the cheapest stacks that fit in --gpu")
    p.set_defaults(func=run_plan)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(seq=args.seq, batch=args.batch, dtype=args.dtype, processes=args.processes, fsdp=args.fsdp,
                gpu=args.gpu, offload_optimizer=args.offload_optimizer)


def candidates(model_plan: Plan) -> list[dict[str, Any]]:
    """Stacks worth trying, from plain full fine-tuning to QLoRA-style."""
    out = []
    for memory in MEMORY_OPTIONS:
        for optimizer in ("adamw", "adamw8bit", "galore_adamw8bit:rank=256,layerwise=true", "apollo_mini"):
            out.append(dict(adapter=None, optimizer=optimizer, memory=memory, quant=None))
        for quant in (None, "8bit", "4bit"):
            out.append(dict(adapter="lora:r=16", optimizer="adamw", memory=memory, quant=quant))
    return out


def overhead(stack: dict[str, Any]) -> float:
    factor = OVERHEAD["memory"][stack["memory"]] * OVERHEAD["quant"][stack["quant"]]
    if stack["adapter"]:
        factor *= OVERHEAD["adapter"]
    if stack["optimizer"] not in ("adamw", "adamw8bit"):
        factor *= OVERHEAD["low_rank_optimizer"]
    return factor


def _print_all_memory(args: argparse.Namespace) -> int:
    """One plan per memory option, side by side (``--memory all``)."""
    results = {m: plan(args.model, adapter=args.adapter, optimizer=args.optimizer, memory=m, quant=args.quant,
                       **_options(args)) for m in MEMORY_OPTIONS}
    if args.json:
        print(json.dumps({m: r.to_json() for m, r in results.items()}, indent=2))
        return 0
    first = next(iter(results.values()))
    print(f"{first.model}: " + ", ".join(f"{k}={v}" for k, v in first.setting.items() if k != "memory") + "\n")
    print("| GiB | " + " | ".join(MEMORY_OPTIONS) + " |")
    print("|---|" + "---:|" * len(MEMORY_OPTIONS))
    for label, attr in (("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer_state"),
                        ("saved activations", "activations"), ("logits + loss transient", "transient"),
                        ("peak", "peak")):
        print(f"| {label} | " + " | ".join(f"{getattr(r, attr) / 2**30:.2f}" for r in results.values()) + " |")
    if first.gpu_bytes is not None:
        print("| fits | " + " | ".join("yes" if r.fits else "no" for r in results.values()) + " |")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    try:
        if args.search:
            if args.gpu is None:
                raise ValueError("--search needs --gpu (the memory per GPU to fit in)")
            base = _options(args)
            # every stack holds at least the 4-bit weights: if they alone do not fit, nothing does (one plan, not all)
            floor = plan(args.model, **base, adapter="lora:r=16", optimizer="adamw", memory="none", quant="4bit")
            if floor.gpu_bytes is not None and floor.weights > floor.gpu_bytes:
                raise ValueError(f"no stack fits in {args.gpu}: the 4-bit weights alone take {floor.weights / 1e9:.2f} "
                                 "GB; add GPUs (--processes N --fsdp)")
            rows = []
            for stack in candidates(None):
                try:
                    result = plan(args.model, **base, **stack)
                except ValueError:
                    continue
                if result.fits:
                    rows.append((overhead(stack), result.peak, stack))
            if not rows:
                raise ValueError(f"no stack fits in {args.gpu} at seq {args.seq}, batch {args.batch}: lower them, or "
                                 "add GPUs (--processes N --fsdp)")
            rows.sort(key=lambda r: (r[0], r[1]))
            if args.json:
                print(json.dumps([{"overhead": o, "peak": p, **s} for o, p, s in rows], indent=2))
                return 0
            print(f"Stacks that fit in {args.gpu} ({args.model}, seq {args.seq}, batch {args.batch}), cheapest "
                  "first (step-time factor vs bf16 full fine-tuning, a rule of thumb):\n")
            print("| step-time factor | peak GB | adapter | optimizer | memory | base |")
            print("|---:|---:|---|---|---|---|")
            for o, p, s in rows[:12]:
                print(f"| {o:.2f} | {p / 1e9:.1f} | {s['adapter'] or 'full'} | {s['optimizer']} | {s['memory']} | "
                      f"{s['quant'] or args.dtype} |")
            return 0
        if args.memory == "all":
            return _print_all_memory(args)
        result = plan(args.model, adapter=args.adapter, optimizer=args.optimizer, memory=args.memory,
                      quant=args.quant, **_options(args))
    except (ValueError, KeyError) as err:
        raise LeanTuneError(str(err).splitlines()[0]) from None
    print(json.dumps(result.to_json(), indent=2) if args.json else result)
    return 0
