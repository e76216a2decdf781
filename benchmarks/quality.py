"""Quality benchmark: fine-tune the real pretrained MiniLM on real text with every method.

Data (``--data``): ``shakespeare`` (default) — which kind of play (First Folio: comedy / history / tragedy) a speech
comes from, Shakespeare's public-domain texts (``make bench-deps``), split inside each play by position
(``recipes/common.py::load_shakespeare_genre``); ``sentiment`` — the shipped generated 2-way set (saturates near 100%).
Methods: head only, full fine-tuning, peft LoRA (also with LoRA-GGPO), and every leantune adapter (LoRA-XS,
LoRA-SB, ALLoRA, DyLoRA, NOLA, Compacter, Compacter++). Same data, same number of steps and batch for all; a small
learning-rate sweep per method picked on a validation split carved from train (mean over seeds), test
accuracy reported for the chosen rate as mean ± std over the seeds. The classifier head trains in every
method (peft ``task_type="SEQ_CLS"`` puts it in ``modules_to_save``; checked for every run).

    python benchmarks/quality.py            # full run (~30-60 min on 2 CPU cores)
    python benchmarks/quality.py --quick    # smoke run (a minute)
    python benchmarks/quality.py ... --time-steps   # then, on a quiet machine: step times for the report

Prints a markdown table and writes benchmarks/results/quality.{md,png,json}. Finished runs are cached in
benchmarks/results/quality_runs.json, so an interrupted run resumes (``--fresh`` ignores the cache).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

from recipes.common import load_minilm_classifier, load_sentiment, load_shakespeare_genre  # noqa: E402

LINEAR_TARGETS = ["query", "key", "value", "dense"]  # every Linear of the encoder (and the pooler)


def _peft_configs() -> dict[str, Callable[[], Any]]:
    from peft import LoraConfig

    from leantune.adapters import ALLoRAConfig, DyLoRAConfig, LoraSBConfig, LoraXSConfig
    from leantune.adapters.bottleneck import CompacterConfig, CompacterPlusPlusConfig
    from leantune.adapters.nola import NolaConfig

    t = dict(task_type="SEQ_CLS")
    return {
        "LoRA r=8 (peft)": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR_TARGETS, lora_dropout=0.0, **t),
        "LoRA r=8 + GGPO (peft)": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR_TARGETS,
                                                     lora_dropout=0.0, **t),
        "LoRA r=1 (peft)": lambda: LoraConfig(r=1, lora_alpha=2, target_modules=LINEAR_TARGETS, lora_dropout=0.0, **t),
        "LoRA-XS r=16": lambda: LoraXSConfig(r=16, lora_alpha=16, target_modules=LINEAR_TARGETS, **t),
        "LoRA-SB r=16": lambda: LoraSBConfig(r=16, target_modules=LINEAR_TARGETS, **t),
        "ALLoRA r=8": lambda: ALLoRAConfig(r=8, target_modules=LINEAR_TARGETS, **t),
        "DyLoRA r=8": lambda: DyLoRAConfig(r=8, lora_alpha=16, target_modules=LINEAR_TARGETS, **t),
        "DyLoRA r=8 unfrozen": lambda: DyLoRAConfig(r=8, lora_alpha=16, frozen=False, target_modules=LINEAR_TARGETS, **t),
        "NOLA k=l=256 r=8": lambda: NolaConfig(
            r=8, num_basis_A=256, num_basis_B=256, nola_alpha=8, target_modules=LINEAR_TARGETS, cache_bases=True, **t
        ),
        "Compacter": lambda: CompacterConfig(**t),
        "Compacter++": lambda: CompacterPlusPlusConfig(**t),
    }


LR_GRID = {  # first entry: the rate used with --one-lr (our best guess for short runs)
    "head only": [1e-2, 3e-3],
    "full fine-tuning": [1e-4, 3e-5],
    "LoRA r=8 (peft)": [2e-3, 5e-4],
    "LoRA r=8 + GGPO (peft)": [2e-3, 5e-4],
    "LoRA r=1 (peft)": [4e-3, 1e-3],
    "LoRA-XS r=16": [1e-2, 3e-2],
    "LoRA-SB r=16": [2e-3, 1e-2],
    "ALLoRA r=8": [2e-3, 5e-4],
    "DyLoRA r=8": [2e-3, 5e-4, 1e-2],  # α/b is up to r× LoRA's scale: 2e-3 can collapse, 5e-4 underfits
    "DyLoRA r=8 unfrozen": [2e-3, 1e-2],
    "NOLA k=l=256 r=8": [2e-2, 5e-3],
    "Compacter": [1e-2, 3e-3],
    "Compacter++": [1e-2, 3e-3],
}


NUM_LABELS = {"sentiment": 2, "shakespeare": 3}
DATA = {"name": "shakespeare"}  # set by main(); build() reads the label count from it


def build(method: str, seed: int, batches: list[dict], lr: float, warmup: int) -> torch.nn.Module:
    """The model for ``method`` with exactly the parameters that method trains set trainable."""
    model, _ = load_minilm_classifier(num_labels=NUM_LABELS[DATA["name"]], seed=seed)
    if method == "head only":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        return model
    if method == "full fine-tuning":
        return model
    config = _peft_configs()[method]()
    torch.manual_seed(seed)
    if method.startswith("LoRA-SB"):
        from leantune.adapters import get_lora_sb_model

        # the first optimizer step under linear warmup uses lr / warmup
        return get_lora_sb_model(model, config, batches[:4], lr=lr / max(1, warmup), progress=False)
    from peft import get_peft_model

    return get_peft_model(model, config)


def saved_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes autograd keeps for backward in one training step (deduplicated by storage)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def adapter_file_bytes(method: str, model: torch.nn.Module) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if method == "head only":
            path = Path(tmp) / "head.safetensors"
            save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, str(path))
            return path.stat().st_size
        if method == "full fine-tuning":
            path = Path(tmp) / "model.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            return path.stat().st_size
        model.save_pretrained(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def count(model: torch.nn.Module) -> dict[str, int]:
    from leantune.adapters.bottleneck import count_trainable

    return count_trainable(model)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Any, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = trim(data[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    model.train()
    return correct / len(data)


def trim(batch: dict) -> dict:
    """Drop the all-padding tail columns (sequences stay ≤ 32 tokens; same result, less compute)."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :length] if v.dim() == 2 else v) for k, v in batch.items()}


def training_batches(train: Any, steps: int, batch: int, seed: int) -> list[dict]:
    """``steps`` batches of ``batch`` examples in the seed's order (every example once per pass over the data)."""
    order = torch.Generator().manual_seed(seed)
    passes = math.ceil(steps * batch / len(train)) + 1
    indices = torch.cat([torch.randperm(len(train), generator=order) for _ in range(passes)])
    return [trim(train[indices[i * batch : (i + 1) * batch].tolist()]) for i in range(steps)]


def attach_ggpo(method: str, model: torch.nn.Module, seed: int):
    """LoRA-GGPO's training-time perturbation for the "+ GGPO" methods (None for the others)."""
    if "GGPO" not in method:
        return None
    from leantune.adapters.ggpo import GGPO

    return GGPO(model, seed=seed)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ggpo, batch: dict) -> torch.Tensor:
    """One training step (forward, backward, GGPO's gradient hook if any, AdamW); returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    if ggpo is not None:
        ggpo.after_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def run_one(method: str, lr: float, seed: int, data: dict, args: argparse.Namespace, keep_model: bool = False) -> dict:
    from transformers import get_linear_schedule_with_warmup

    batches = training_batches(data["train"], args.steps, args.batch, seed)
    warmup = max(1, int(0.06 * args.steps))
    model = build(method, seed, batches, lr, warmup)
    model.train()
    counts = count(model)
    if method != "full fine-tuning" and counts["other"] == 0 and counts["total"] > 0:
        raise RuntimeError(f"{method}: the classifier head is not trainable.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, args.steps)
    activation_bytes = saved_activation_bytes(model, batches[0])
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    ggpo = attach_ggpo(method, model, seed)
    start = time.perf_counter()
    losses = []
    for batch in batches:
        losses.append(train_step(model, optimizer, ggpo, batch).item())
        schedule.step()
    wall = time.perf_counter() - start
    if ggpo is not None:
        ggpo.remove()
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "val_acc": accuracy(model, data["val"]),
        "test_acc": accuracy(model, data["test"]),
        "final_loss": statistics.fmean(losses[-20:]),
        "trainable": counts,
        "file_bytes": adapter_file_bytes(method, model),
        "wall_s": wall,
        # params + grads + AdamW state (2×) of the trainable tensors + activations saved for backward
        "train_mem_bytes": param_bytes + 3 * trainable_bytes + activation_bytes,
        **({"model": model} if keep_model else {}),
    }


def step_times(methods: list[str], data: dict, args: argparse.Namespace, rounds: int = 5,
               steps: int = 3) -> dict[str, dict]:
    """Training-step time per method on a quiet machine: every method's model is built once (seed 0, its first
    learning rate), warmed up by one step, then timed for ``steps`` steps per round, rounds interleaved across
    methods so drifts of the machine hit all alike. Returns {method: {"median_ms", "min_ms", "max_ms"}}."""
    from tqdm.auto import tqdm

    batches = training_batches(data["train"], rounds * steps + 1, args.batch, 0)
    runs = {}
    for method in methods:
        model = build(method, 0, batches, LR_GRID[method][0], 1)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR_GRID[method][0])
        runs[method] = (model, optimizer, attach_ggpo(method, model, 0))
    for method, run in runs.items():
        train_step(*run, batches[0])  # warm-up: allocations, first-call dispatch
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in tqdm(range(rounds), desc="timing rounds"):
        for method, run in runs.items():
            for i in range(steps):
                start = time.perf_counter()
                train_step(*run, batches[1 + r * steps + i])
                times[method].append(time.perf_counter() - start)
    return {m: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t)}
            for m, t in times.items()}


def load_data(args: argparse.Namespace) -> dict:
    columns = ["input_ids", "attention_mask", "labels"]
    _, tokenizer = load_minilm_classifier(num_labels=2, seed=0)
    if DATA["name"] == "shakespeare":
        ds = load_shakespeare_genre(tokenizer, max_length=64, train_size=args.train_size,
                                    eval_size=args.test_size or 1500).with_format("torch", columns=columns)
        return {"train": ds["train"], "val": ds["val"], "test": ds["test"]}
    ds = load_sentiment(tokenizer, max_length=32).with_format("torch", columns=columns)
    split = ds["train"].train_test_split(test_size=args.val_size, seed=1234)
    test = ds["test"] if args.test_size is None else ds["test"].select(range(args.test_size))
    return {"train": split["train"], "val": split["test"], "test": test}


def summarize(runs: list[dict], methods: list[str], select_seed: int | None = None) -> list[dict]:
    """One row per method: the learning rate with the best mean validation accuracy (over ``select_seed``'s runs
    only, when given), and the test accuracy of that rate over all seeds run with it."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        by_lr: dict[float, list[dict]] = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r)
        def score(lr: float) -> float:
            pool = [r for r in by_lr[lr] if select_seed is None or r["seed"] == select_seed] or by_lr[lr]
            return statistics.fmean(r["val_acc"] for r in pool)

        best_lr = max(by_lr, key=score)
        chosen = by_lr[best_lr]
        tests = [100 * r["test_acc"] for r in chosen]
        rows.append(
            {
                "method": method,
                "lr": best_lr,
                "seeds": len(chosen),
                "test_mean": statistics.fmean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "final_loss": statistics.fmean(r["final_loss"] for r in chosen),
                # the numbers the choice was made on (the first seed's, with select_seed), not a mix of seeds
                "val_by_lr": {lr: 100 * score(lr) for lr in sorted(by_lr)},
                "trainable": chosen[0]["trainable"],
                "file_bytes": chosen[0]["file_bytes"],
                "wall_s": statistics.fmean(r["wall_s"] for r in chosen),
                "train_mem_mb": chosen[0]["train_mem_bytes"] / 2**20,
            }
        )
    return rows


def markdown(rows: list[dict], timing: dict | None = None) -> str:
    """The results table; with ``timing`` (``--time-steps``) a column of quiet-machine step times."""
    timed = timing is not None and any(r["method"] in timing["methods"] for r in rows)
    lines = [
        "| method | test acc % (mean ± std) | final train loss | chosen lr | val acc % per lr (seeds it was chosen on) "
        "| adapter params | + LayerNorm | + head | total trainable | saved file | train time (s) | "
        + ("step ms, quiet (median, min–max) | " if timed else "") + "train memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if timed else ""),
    ]
    for r in rows:
        step = ""
        if timed:
            t = timing["methods"].get(r["method"])
            step = f"{t['median_ms']:.0f} ({t['min_ms']:.0f}–{t['max_ms']:.0f}) | " if t else "— | "
        t = r["trainable"]
        val = ", ".join(f"{lr:g}: {v:.1f}" for lr, v in r["val_by_lr"].items())
        size = r["file_bytes"] / 1024
        size_text = f"{size / 1024:.1f} MB" if size > 1024 else f"{size:.1f} KB"
        lines.append(
            f"| {r['method']} | {r['test_mean']:.1f} ± {r['test_std']:.1f} (n={r['seeds']}) | "
            f"{r.get('final_loss', float('nan')):.3f} | {r['lr']:g} | {val} | "
            f"{t['adapter']:,} | {t['layer_norm']:,} | {t['other']:,} | {t['total']:,} | {size_text} | "
            f"{r['wall_s']:.0f} | {step}{r['train_mem_mb']:.0f} |"
        )
    return "\n".join(lines)


DATA_TITLES = {"sentiment": "the shipped sentiment set (2-way)",
               "shakespeare": "Shakespeare speeches → First Folio genre (3-way, real text)"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = "osD^v<>PXh*"
    for i, r in enumerate(rows):  # a legend, not text labels: the methods near 100% would overlap
        x = max(1, r["trainable"]["total"])
        ax.errorbar(x, r["test_mean"], yerr=r["test_std"], fmt=markers[i % len(markers)], capsize=3, ms=7,
                    label=f"{r['method']} ({r['test_mean']:.1f}%)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + LayerNorm + classifier head), log scale")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6: " + DATA_TITLES[DATA["name"]])
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all)")
    parser.add_argument("--data", choices=list(NUM_LABELS), default="shakespeare",
                        help="shakespeare: real text, 3 genres (default); sentiment: the shipped 2-way set")
    parser.add_argument("--train-size", type=int, default=6000, help="training speeches (shakespeare)")
    parser.add_argument("--val-size", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-lr", action="store_true", help="only the first lr of each method's grid")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: few steps, one seed, one lr")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--select-on-first-seed", action="store_true",
                        help="sweep learning rates on the first seed only; later seeds run the rate it chose")
    parser.add_argument("--tag", default="quality", help="output file stem under benchmarks/results/")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the cached runs of these settings; run nothing")
    parser.add_argument("--time-steps", action="store_true",
                        help="measure every method's training-step time (interleaved rounds; run it with nothing "
                             "else on the machine), save it as <tag>_timing.json for the report, then report only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    DATA["name"] = args.data
    if args.quick:
        args.steps, args.seeds, args.one_lr, args.tag = 3, [0], True, f"{args.tag}_quick"
        args.val_size, args.test_size = 32, 64
    from tqdm.auto import tqdm

    methods = args.methods or list(LR_GRID)
    unknown = [m for m in methods if m not in LR_GRID]
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {list(LR_GRID)}.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_path = RESULTS / f"{args.tag}_runs.json"
    setting = {"steps": args.steps, "batch": args.batch, "val_size": args.val_size, "test_size": args.test_size,
               "data": args.data, "train_size": args.train_size}
    cache = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    if cache.get("setting") != setting:
        cache = {"setting": setting, "runs": {}}
    if (args.report_only or args.time_steps) and not cache["runs"]:  # never overwrite a report with an empty one
        raise SystemExit(f"--report-only: no cached runs in {cache_path} for these settings {setting}")
    data = load_data(args)
    if args.time_steps:  # merged into an earlier timing of the same setting and threads (a subset can be re-timed)
        old = _timing(args)
        kept = old["methods"] if old and old["threads"] == args.threads else {}
        timing = {**_timing_setting(args), "methods": {**kept, **step_times(methods, data, args)}}
        _timing_path(args).write_text(json.dumps(timing, indent=1))
        args.report_only = True
    # seed-major, so an interrupted run still has every method and learning rate for the first seed
    grid = {m: LR_GRID[m][:1] if args.one_lr else LR_GRID[m] for m in methods}
    first = args.seeds[0]
    jobs = [(m, lr, first) for m in methods for lr in grid[m]]
    later = [(m, s) for s in args.seeds[1:] for m in methods]
    if not args.select_on_first_seed:
        jobs += [(m, lr, s) for m, s in later for lr in grid[m]]
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])  # quoted: re-runnable as printed
    select_seed = first if args.select_on_first_seed else None

    def pending():
        yield from list(jobs)
        if args.select_on_first_seed:  # the rate each method's first-seed sweep chose, once that sweep is done
            for method, seed in later:
                runs = [cache["runs"][f"{method}|{lr}|{first}"] for lr in grid[method]]
                lr = max(runs, key=lambda r: r["val_acc"])["lr"]
                jobs.append((method, lr, seed))
                yield method, lr, seed

    total = len(jobs) + (len(later) if args.select_on_first_seed else 0)
    for method, lr, seed in tqdm(pending(), desc="runs", total=total, disable=args.report_only):
        key = f"{method}|{lr}|{seed}"
        if args.report_only and key not in cache["runs"]:
            if args.select_on_first_seed and seed == first:
                break  # no later seed can be scheduled before the first seed's sweep is complete
            continue
        if key not in cache["runs"]:
            cache["runs"][key] = run_one(method, lr, seed, data, args)
            cache_path.write_text(json.dumps(cache, indent=1))
            r = cache["runs"][key]
            tqdm.write(f"{key}: val {r['val_acc']:.3f} test {r['test_acc']:.3f} loss {r['final_loss']:.3f} {r['wall_s']:.0f}s")
            write_report(cache, jobs, methods, data, args, command, select_seed)  # after each run: partial results
    print(write_report(cache, jobs, methods, data, args, command, select_seed))


def _timing_setting(args: argparse.Namespace) -> dict:
    return {"threads": args.threads, "batch": args.batch, "data": args.data}


def _timing_path(args: argparse.Namespace) -> Path:
    return RESULTS / f"{args.tag}_timing.json"


def _timing(args: argparse.Namespace) -> dict | None:
    """The saved step times if they were measured with this run's batch and data (their thread count is recorded
    in them: a report may show step times at another count than its runs used), else None."""
    path = _timing_path(args)
    if not path.exists():
        return None
    timing = json.loads(path.read_text())
    return timing if (timing.get("batch"), timing.get("data")) == (args.batch, args.data) else None


def write_report(cache: dict, jobs: list, methods: list[str], data: dict, args: argparse.Namespace, command: str,
                 select_seed: int | None = None) -> str:
    runs = [cache["runs"][f"{m}|{lr}|{s}"] for m, lr, s in jobs if f"{m}|{lr}|{s}" in cache["runs"]]
    rows = summarize(runs, methods, select_seed)
    table = markdown(rows, _timing(args))
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, RESULTS / f"{args.tag}.png")
    done = f"{len(runs)} of {len(jobs)} runs finished." if len(runs) < len(jobs) else "All runs finished."
    (RESULTS / f"{args.tag}.md").write_text(
        f"# Quality benchmark\n\nCommand: `{command.strip()}`\n\n"
        f"MiniLM-L6 (all-MiniLM-L6-v2, pretrained) + new head, {DATA_TITLES[args.data]}: "
        f"{len(data['train'])} train / {len(data['val'])} validation (carved from train) / {len(data['test'])} test; "
        f"{args.steps} AdamW steps, batch {args.batch}, sequence length ≤ {64 if args.data == 'shakespeare' else 32}, "
        f"linear schedule with 6% warmup, "
        f"seeds {args.seeds}. Learning rate chosen per method by "
        + ("validation accuracy of the first seed (later seeds run only that rate)" if select_seed is not None else
           "mean validation accuracy") + "; test accuracy of that lr. "
        f"{done}\n\n{table}\n\n![accuracy vs trainable parameters]({args.tag}.png)\n"
    )
    return table


if __name__ == "__main__":
    main()
