"""Does sign-aligning GaLore's SVD bases change training quality? And is a run reproducible when LAPACK picks other
signs (another machine, thread count or process count)?

leantune orients every new SVD basis (``leantune.optim.svd``: canonical signs first, then aligned with the previous
basis), so that moments kept (``moment_policy="keep"``, the default) or rotated across a refresh mean the same thing
before and after it. galore-torch keeps LAPACK's raw signs (``svd_signs="lapack"`` here). Both are trained on the
tiny-Llama pretraining task of ``optim_pretrain.py`` (real English text, byte tokens, the same batches per seed),
3 seeds; each is also run once more per seed with the SVD's signs scrambled (a valid SVD with other signs, as another
machine's LAPACK may return it: ``leantune/testing/svd_signs.py``). Aligned runs must not move at all under the scramble; raw-sign
runs show how far a last-bit difference can move a run.

    python benchmarks/svd_signs.py [--steps 600] [--seeds 0 1 2]

Writes ``benchmarks/results/svd_signs.md`` (the table), ``svd_signs.png`` (loss curves) and ``svd_signs_runs.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import leantune.optim.svd as svd  # noqa: E402
from benchmarks import optim_pretrain as pretrain  # noqa: E402
from leantune.optim import OptimizerConfig, build_optimizer  # noqa: E402
from leantune.testing.svd_signs import scrambled_signs, scrambling  # noqa: E402

LOW = pretrain.LOW
METHODS = {
    "GaLore (keep)": OptimizerConfig("galore_adamw", **LOW),
    "GaLore (rotate)": OptimizerConfig("galore_adamw", **LOW, moment_policy="rotate"),
    "Fira (keep)": OptimizerConfig("fira_adamw", **LOW),
    "GradNormLoRP (keep)": OptimizerConfig("gradnorm_lorp", **LOW),
}


def train(config: OptimizerConfig, signs: str, scramble: bool, data: list[torch.Tensor], seed: int, lr: float) -> list:
    """Losses of one run (``optim_pretrain``'s model, schedule and batches)."""
    model = pretrain.make_model(seed)
    opt = build_optimizer(model, OptimizerConfig(**{**config.to_dict(), "lr": lr}))
    for group in opt.param_groups:
        if "rank" in group:
            group["svd_signs"] = signs
    steps = len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (steps // 10)) * max(0.1, 1 - s / steps))
    svd.sign_hook = scrambled_signs if scramble else None
    raw = torch.linalg.svd
    if scramble and signs == "lapack":  # raw signs skip the hook: scramble LAPACK itself for this run
        torch.linalg.svd = scrambling(raw)
    losses = []
    try:
        for x in data:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        svd.sign_hook = None
        torch.linalg.svd = raw
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(pretrain.RESULTS / "svd_signs"))
    args = ap.parse_args()
    if args.steps < 20 or args.batch < 1 or not args.seeds:
        ap.error("--steps >= 20, --batch >= 1 and at least one seed")
    tokens, source = pretrain.text_corpus()
    cache = Path(args.out + "_runs.json")
    done = json.loads(cache.read_text()) if cache.exists() else {}
    variants = [(signs, scramble) for signs in ("aligned", "lapack") for scramble in (False, True)]
    for seed in args.seeds:
        data = pretrain.batches(tokens, args.steps, args.batch, seed)
        for label, config in METHODS.items():
            for signs, scramble in variants:
                key = f"{label}|{signs}|{scramble}|{seed}|{args.steps}|{args.batch}|{args.lr}"
                if key not in done:
                    print(f"{label}, {signs} signs{', scrambled' if scramble else ''}, seed {seed}", flush=True)
                    done[key] = train(config, signs, scramble, data, seed, args.lr)
                    cache.write_text(json.dumps(done))

    def runs(label, signs, scramble):
        return [done[f"{label}|{signs}|{scramble}|{s}|{args.steps}|{args.batch}|{args.lr}"] for s in args.seeds]

    def final(curve):
        return statistics.fmean(curve[-20:])

    def mean_std(xs):
        return f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"

    lines = [f"### SVD sign alignment: tiny Llama pretraining on {source}, {args.steps} steps x batch {args.batch}, "
             f"lr {args.lr}, rank {LOW['rank']}, refresh every {LOW['update_proj_gap']} steps, seeds {args.seeds}",
             "", f"Command: `python benchmarks/svd_signs.py --steps {args.steps} --seeds "
             f"{' '.join(map(str, args.seeds))}`", "",
             "| optimizer | final loss, aligned signs (leantune) | final loss, LAPACK signs (galore-torch) | "
             "aligned − LAPACK (per seed) | aligned: moved by other signs | LAPACK: moved by other signs |",
             "|---|---|---|---|---|---|"]
    for label in METHODS:
        aligned, lapack = runs(label, "aligned", False), runs(label, "lapack", False)
        diffs = " / ".join(f"{final(a) - final(b):+.4f}" for a, b in zip(aligned, lapack))
        moved = []
        for signs, base in (("aligned", aligned), ("lapack", lapack)):
            other = runs(label, signs, True)
            moved.append(" / ".join(f"{max(abs(x - y) for x, y in zip(a, b)):.1e}" for a, b in zip(base, other)))
        lines.append(f"| {label} | {mean_std([final(r) for r in aligned])} | {mean_std([final(r) for r in lapack])} | "
                     f"{diffs} | {moved[0]} | {moved[1]} |")
    lines += ["", "Final loss: mean of the last 20 steps (mean ± std over seeds). 'Moved by other signs': the largest "
              "per-step loss difference between a run and the same run with the SVD's signs scrambled (per seed)."]
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out + ".md").write_text(table + "\n")
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.6), sharey=True)
    for ax, label in zip(axes, METHODS):
        for signs, color in (("aligned", "C0"), ("lapack", "C3")):
            curves = torch.tensor([pretrain.smooth(r) for r in runs(label, signs, False)])
            mean = curves.mean(0)
            std = curves.std(0) if len(args.seeds) > 1 else torch.zeros_like(mean)
            ax.plot(mean, color=color, lw=1.2, label=f"{signs} signs")
            ax.fill_between(range(len(mean)), mean - std, mean + std, color=color, alpha=0.15)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    axes[0].set_ylabel("train loss (20-step mean; band ± std)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"\nplot: {args.out}.png; runs: {cache}")


if __name__ == "__main__":
    main()
