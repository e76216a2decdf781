"""ComPEFT (`leantune compress`) on real adapters: accuracy before/after compression and the size ratio.

Each adapter is trained once on the real pretrained MiniLM (``benchmarks/quality.py``'s settings and data: Shakespeare
speeches → First Folio genre, 3-way), saved, compressed at densities 0.05 / 0.1 / 0.2 (per-tensor scope, α "auto",
Golomb positions) and at 0.1 with the paper's global scope, then each compressed folder is loaded with
``PeftModel.from_pretrained`` onto a fresh MiniLM and evaluated on the same test set — twice: with α "auto" (a fixed
rule, no data) and with α chosen as the paper does, on validation data (``leantune.compress.tune_alpha`` over
``ALPHAS`` below, scored by validation accuracy; the test accuracy of the chosen α is reported). Sizes: the
compressed update's stored bytes (positions + signs + scale) against the same tensors in fp32, and the whole
folder's ratio with what is kept exactly (the classifier head, frozen factors).

    python benchmarks/compress.py [--steps 400] [--methods "LoRA r=8 (peft)" ...] [--lr "NOLA k=l=256 r=8=5e-3"]
                                  [--adapters DIR]   # keep the trained adapters there (reused when present)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import quality as Q  # noqa: E402
from recipes.common import load_minilm_classifier  # noqa: E402

METHODS = ["LoRA r=8 (peft)", "LoRA-XS r=16", "ALLoRA r=8", "DyLoRA r=8", "NOLA k=l=256 r=8", "Compacter"]
ALPHAS = ("auto", 1.0, 2.0, 3.0, 5.0, 8.0)  # candidates for α on validation (a subset of leantune.compress.ALPHAS)
VARIANTS = [(0.05, "tensor"), (0.1, "tensor"), (0.2, "tensor"), (0.1, "global")]


_BASE: dict[int, torch.nn.Module] = {}


def evaluate_folder(folder: Path, data, seed: int, split: str = "test") -> float:
    """Accuracy of the adapter in ``folder`` on a fresh copy of the MiniLM (loaded once, copied per folder)."""
    from peft import PeftModel

    if seed not in _BASE:
        _BASE[seed] = load_minilm_classifier(num_labels=Q.NUM_LABELS[Q.DATA["name"]], seed=seed)[0]
    return Q.accuracy(PeftModel.from_pretrained(copy.deepcopy(_BASE[seed]), folder), data[split])


def trained_adapter(method: str, lr: float, data, args, folder: Path) -> float:
    """Train (or reuse from ``folder``, if trained with the same settings) one adapter; returns its test accuracy
    before compression."""
    settings = {"method": method, "lr": lr, "steps": args.steps, "batch": args.batch, "train_size": args.train_size}
    stamp = folder / "benchmark_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return 100 * evaluate_folder(folder, data, 0)
    run = Q.run_one(method, lr, 0, data, args, keep_model=True)
    model = run.pop("model")
    model.save_pretrained(folder)
    stamp.write_text(json.dumps(settings))
    return 100 * Q.accuracy(model, data["test"])


def main() -> None:
    import leantune
    from leantune.compress import tune_alpha

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--test-size", type=int, default=1500)
    ap.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR",
                    help="learning rate overrides (default: the first of quality.py's grid)")
    ap.add_argument("--adapters", type=Path, default=None, help="keep trained adapters here and reuse them")
    ap.add_argument("--tag", default="compress", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    args.val_size, args.seeds = 300, [0]
    lrs = {m: Q.LR_GRID[m][0] for m in args.methods}
    for item in args.lr:
        method, _, value = item.rpartition("=")
        if method not in lrs:
            raise SystemExit(f"--lr {item!r}: {method!r} is not one of --methods {args.methods}")
        lrs[method] = float(value)
    data = Q.load_data(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.adapters or Path(tmp)
        for method in args.methods:
            folder = keep / method.replace(" ", "_").replace("/", "_").replace("=", "")
            row = {"method": method, "lr": lrs[method], "variants": []}
            row["acc"] = trained_adapter(method, lrs[method], data, args, folder)
            for density, scope in VARIANTS:
                out = Path(tmp) / f"{folder.name}_{density}_{scope}"
                try:
                    info = leantune.compress_adapter(folder, out, density=density, scope=scope)
                    tuned = tune_alpha(folder, Path(str(out) + "_tuned"), density=density, scope=scope, alphas=ALPHAS,
                                       score=lambda f: evaluate_folder(f, data, 0, "val"), progress=False)
                except leantune.LeanTuneError as err:  # e.g. a density that keeps no entry of a small tensor
                    row["variants"].append({"density": density, "scope": scope, "refused": str(err)})
                    continue
                acc = 100 * evaluate_folder(out, data, 0)
                tuned_acc = (acc if tuned["alpha"] == "auto"  # the same folder: its test accuracy is known
                             else 100 * evaluate_folder(Path(str(out) + "_tuned"), data, 0))
                row["variants"].append({"density": density, "scope": scope, "acc": acc,
                                        "tuned_alpha": tuned["alpha"], "val_by_alpha": tuned["scores"],
                                        "tuned_acc": tuned_acc,
                                        "ratio": info["ratio"], "ratio_vs_fp16": info["ratio_vs_fp16"],
                                        "stored_kb": info["stored_bytes"] / 1024,
                                        "kept_kb": info["kept_bytes"] / 1024,
                                        "folder_ratio": (info["original_bytes"] + info["kept_bytes"]) /
                                        (info["stored_bytes"] + info["kept_bytes"])})
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = " | ".join(f"{d:g} {s}" for d, s in VARIANTS)
    print(f"\n### ComPEFT on MiniLM adapters ({Q.DATA_TITLES[Q.DATA['name']]}; {args.steps} steps; test "
          f"{len(data['test'])}; validation {len(data['val'])} for α)\n")
    print(f"| adapter (lr) | accuracy % before | after, α auto / α on validation: {header} | update ratio vs fp32 "
          f"(vs fp16) at {' / '.join(f'{d:g}' for d, _ in VARIANTS[:3])} | kept exactly (head, frozen) |")
    print("|---|---|" + "---|" * len(VARIANTS) + "---|---|")
    for r in rows:
        accs = " | ".join("refused" if "refused" in v else
                          f"{v['acc']:.1f} / {v['tuned_acc']:.1f} (α {v['tuned_alpha']})" for v in r["variants"])
        ratios = " / ".join("—" if "refused" in v else f"{v['ratio']:.0f}× ({v['ratio_vs_fp16']:.0f}×)"
                            for v in r["variants"][:3])
        kept = next((f"{v['kept_kb']:.0f} KB" for v in r["variants"] if "kept_kb" in v), "—")
        print(f"| {r['method']} ({r['lr']:g}) | {r['acc']:.1f} | {accs} | {ratios} | {kept} |")
    (REPO / "benchmarks" / "results" / f"{args.tag}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
