"""Will Llama-2-7B fit? ``leantune plan`` for each stack at seq 2048, batch 1, against accelerate's estimate.

accelerate's ``estimate-memory`` (``accelerate.commands.estimate``) sizes the model from its parameters only
(mixed-precision AdamW: fp32 model, 1.5x gradients, 2x optimizer states, and it reports the largest of these, not
their sum); it knows nothing of adapters, quantized bases, low-rank optimizers or activations, so it prints one
number for every stack. The planner builds each stack on the meta device and adds saved activations and the
logits transient (``leantune/plan``; validated against CPU measurement in ``tests/plan/test_plan.py``).

    python benchmarks/plan_7b.py [--model llama-2-7b] [--seq 2048] [--out benchmarks/results/plan_7b]
    python benchmarks/plan_7b.py --model llama-3-8b --seq 4096 --out benchmarks/results/plan_llama3_8b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from leantune.plan import plan  # noqa: E402

STACKS = [  # label, plan() keyword arguments
    ("AdamW, full fine-tuning (bf16)", dict(optimizer="adamw")),
    ("8-bit GaLore r=1024, per-layer (bf16)", dict(optimizer="galore_adamw8bit:rank=1024,layerwise=true")),
    ("QLoRA: 4-bit base + LoRA r=64", dict(adapter="lora:r=64", quant="4bit")),
    ("QLoRA + leantune memory + checkpointing", dict(adapter="lora:r=64", quant="4bit",
                                                      memory="leantune+checkpointing")),
    ("8-bit GaLore r=1024 per-layer + leantune memory + checkpointing",
     dict(optimizer="galore_adamw8bit:rank=1024,layerwise=true", memory="leantune+checkpointing")),
    ("QLoRA + leantune memory + checkpointing + chunked loss", dict(adapter="lora:r=64", quant="4bit",
                                                                     memory="leantune+checkpointing+chunked_loss")),
    ("8-bit GaLore r=1024 per-layer + leantune memory + checkpointing + chunked loss",
     dict(optimizer="galore_adamw8bit:rank=1024,layerwise=true", memory="leantune+checkpointing+chunked_loss")),
    ("QLoRA + leantune memory + chunked loss + budget 25% (offload / keep per layer)",
     dict(adapter="lora:r=64", quant="4bit", memory="leantune+chunked_loss+budget:25%")),
    ("QLoRA + leantune memory + chunked loss + least budget (every layer input offloaded)",
     dict(adapter="lora:r=64", quant="4bit", memory="leantune+chunked_loss+budget:1%")),
    ("QLoRA, 8-bit AdamW + leantune memory + chunked loss + least budget",
     dict(adapter="lora:r=64", quant="4bit", optimizer="adamw8bit", memory="leantune+chunked_loss+budget:1%")),
    ("8-bit GaLore r=1024 per-layer + leantune memory + chunked loss + least budget",
     dict(optimizer="galore_adamw8bit:rank=1024,layerwise=true", memory="leantune+chunked_loss+budget:1%")),
    ("Q-GaLore (INT8 weights, 8-bit moments, INT4 P) r=1024 per-layer + leantune memory + checkpointing",
     dict(optimizer="q_galore_adamw8bit:rank=1024,layerwise=true", memory="leantune+checkpointing")),
    ("Q-GaLore r=1024 per-layer + leantune memory + checkpointing + chunked loss",
     dict(optimizer="q_galore_adamw8bit:rank=1024,layerwise=true", memory="leantune+checkpointing+chunked_loss")),
    ("Q-GaLore r=1024 per-layer + leantune memory + checkpointing + chunked loss, optimizer state on the host",
     dict(optimizer="q_galore_adamw8bit:rank=1024,layerwise=true", memory="leantune+checkpointing+chunked_loss",
          offload_optimizer=True)),
]
COMPONENTS = ["weights", "gradients", "optimizer_state", "activations", "transient"]


def accelerate_estimate(model: str) -> float:
    """accelerate estimate-memory's "Training using Adam" (bf16 mixed precision) for the same architecture, GB."""
    from accelerate.commands.estimate import estimate_training_usage

    from leantune.plan import build_model, config_from
    import torch

    net = build_model(config_from(model), torch.float32, "CAUSAL_LM", "meta")
    fp32_bytes = sum(p.numel() * 4 for p in net.parameters())
    return max(estimate_training_usage(fp32_bytes, "bfloat16").values()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--gpu", default="24GB")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/plan_7b"))
    args = parser.parse_args()

    rows = []
    for label, kwargs in STACKS:
        result = plan(args.model, seq=args.seq, batch=1, gpu=args.gpu, **kwargs)
        rows.append((label, result))
    acc = accelerate_estimate(args.model)
    lines = [f"{args.model}, seq {args.seq}, batch 1, one GPU — GB (1e9 bytes); accelerate estimate-memory says "
             f"**{acc:.1f} GB** for every stack", "",
             "| stack | weights | grads | optimizer | activations | logits | peak | fits in " + args.gpu + " |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for label, r in rows:
        vals = [getattr(r, c) / 1e9 for c in COMPONENTS]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) +
                     f" | **{r.peak / 1e9:.1f}** | {'yes' if r.fits else 'no'} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"accelerate_gb": acc, "stacks": [
        {"stack": label, **r.to_json()} for label, r in rows]}, indent=2))
    _plot(rows, acc, args, out.with_suffix(".png"))


def _plot(rows, acc: float, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 1.5))
    names = [label for label, _ in rows][::-1]
    left = [0.0] * len(rows)
    for comp in COMPONENTS:
        vals = [getattr(r, comp) / 1e9 for _, r in rows][::-1]
        ax.barh(names, vals, left=left, label=comp.replace("_", " "))
        left = [a + b for a, b in zip(left, vals)]
    gpu = rows[0][1].gpu_bytes
    if gpu:
        ax.axvline(gpu / 1e9, color="k", ls="--", lw=1, label=f"{args.gpu} GPU")
    ax.axvline(acc, color="r", ls=":", lw=1, label="accelerate estimate-memory")
    ax.scatter([r.peak / 1e9 for _, r in rows][::-1], names, marker="D", color="k", zorder=3, label="predicted peak")
    ax.set_xlabel("GB (bars: all parts; the peak is lower where activations and the step do not overlap)")
    ax.set_title(f"{args.model}, seq {args.seq}, batch 1")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
