"""Run the support matrix and write its table (``benchmarks/results/support_matrix.md``, shown on the docs' support-matrix page).

Every cell is ``LeanTuneCallback(adapter, optimizer, memory, kernels).setup(Trainer(...))`` on a tiny model of the
architecture, trained 4 steps, resumed from step 2, its forward compared with the unpatched model and, for mergeable
adapters, merged and exported (``leantune/testing/support_matrix.py`` says exactly what is checked).

    python benchmarks/support_matrix.py                   # adapter × optimizer × arch × dtype, and
                                                          # adapter × memory × kernels × arch (1,936 cells, ~45 min)
    python benchmarks/support_matrix.py --mode pairwise   # the pairwise covering array `make test` runs (~1 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leantune.testing.support_matrix import FACTORS, Cell, check, pairwise_cells  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def product_cells() -> list[Cell]:
    """Two full products, so that every adapter meets every value of every other factor on every architecture:

    A. adapter × optimizer × architecture × dtype, memory rotating through {off, all} and kernels through {off, on};
    B. adapter × memory × kernels × architecture, optimizer and dtype rotating through their values.
    """
    cells = []
    rotation = list(itertools.product(["off", "all"], FACTORS["kernels"]))
    for i, (adapter, optimizer, arch, dtype) in enumerate(itertools.product(
            FACTORS["adapter"], FACTORS["optimizer"], FACTORS["arch"], FACTORS["dtype"])):
        memory, kernels = rotation[(i + i // 8) % len(rotation)]
        cells.append(Cell(adapter, memory, kernels, optimizer, dtype, arch))
    optimizers, dtypes = FACTORS["optimizer"], FACTORS["dtype"]
    for i, (adapter, memory, kernels, arch) in enumerate(itertools.product(
            FACTORS["adapter"], FACTORS["memory"], FACTORS["kernels"], FACTORS["arch"])):
        cells.append(Cell(adapter, memory, kernels, optimizers[(i * 5) % len(optimizers)],
                          dtypes[(i + i // 4) % len(dtypes)], arch))
    return cells


def run(cells: list[Cell]) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    for cell in tqdm(cells, desc="support matrix"):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                status, detail = check(cell, Path(tmp))
            except Exception as err:  # noqa: BLE001 - a failing cell is a finding, recorded and reported
                status, detail = "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        rows.append({**{f: getattr(cell, f) for f in FACTORS}, "status": status, "detail": detail,
                     "seconds": round(time.perf_counter() - start, 2)})
    return rows


def _short(reason: str) -> str:
    reason = re.sub(r"^PeftModel\w* ", "a model that ", reason)
    reason = re.sub(r" \(trainable tensor shapes: .*\)\.$", ".", reason)
    reason = re.sub(r" \(its trainable tensors have shapes .*?norms\), so", ", so", reason)  # older wording
    return reason if len(reason) < 200 else reason[:197] + "..."


def table(rows: list[dict]) -> str:
    """Every value of every factor (rows) × adapter (columns): ✓ when all its runs passed, refused (numbered
    reason) when all were refused at setup, both with run counts when mixed, FAIL when any failed."""
    reasons: list[str] = []
    adapters = FACTORS["adapter"]
    lines = ["| factor: value | " + " | ".join(adapters) + " |", "|---" * (len(adapters) + 1) + "|"]
    for factor in ("memory", "kernels", "optimizer", "dtype", "arch"):
        for value in FACTORS[factor]:
            entries = []
            for adapter in adapters:
                runs = [r for r in rows if r["adapter"] == adapter and r[factor] == value]
                counts = defaultdict(int)
                for r in runs:
                    counts[r["status"]] += 1
                    if r["status"] == "refused" and _short(r["detail"]) not in reasons:
                        reasons.append(_short(r["detail"]))
                numbers = sorted({reasons.index(_short(r["detail"])) + 1 for r in runs if r["status"] == "refused"})
                refused = "refused" + ",".join(f"⁽{n}⁾" for n in numbers)
                if counts["FAIL"]:
                    entries.append(f"**FAIL {counts['FAIL']}/{len(runs)}**")
                elif not runs:
                    entries.append("–")
                elif not counts["refused"]:
                    entries.append("✓")
                elif not counts["ok"]:
                    entries.append(refused)
                else:
                    entries.append(f"✓ {counts['ok']} · {refused} {counts['refused']}")
            lines.append(f"| {factor}: {value} | " + " | ".join(entries) + " |")
    lines.append("")
    lines += [f"⁽{i}⁾ {reason}" + "  " for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["product", "pairwise"], default="product")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the saved results")
    parser.add_argument("--rerun", nargs="+", metavar="FACTOR=VALUE",
                        help="run again only the saved cells matching any of these (e.g. dtype=bf16), keep the rest")
    args = parser.parse_args()
    saved = RESULTS / f"support_matrix_{args.mode}.json"
    if args.table_only:
        rows = json.loads(saved.read_text())
    elif args.rerun:
        wanted = [tuple(item.split("=", 1)) for item in args.rerun]
        unknown = [f for f, _ in wanted if f not in FACTORS]
        if unknown:
            parser.error(f"unknown factor(s) {unknown}; factors: {list(FACTORS)}")
        rows = json.loads(saved.read_text())
        redo = [i for i, r in enumerate(rows) if any(r[f] == v for f, v in wanted)]
        fresh = run([Cell(**{f: rows[i][f] for f in FACTORS}) for i in redo])
        for i, row in zip(redo, fresh):
            rows[i] = row
        saved.write_text(json.dumps(rows, indent=1))
    else:
        rows = run(product_cells() if args.mode == "product" else pairwise_cells())
        RESULTS.mkdir(exist_ok=True)
        saved.write_text(json.dumps(rows, indent=1))
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    summary = (f"{len(rows)} cells ({args.mode}): {counts['ok']} ✓, {counts['refused']} refused at setup, "
               f"{counts['FAIL']} failed; {sum(r['seconds'] for r in rows) / 60:.1f} min")
    text = f"{summary}\n\n{table(rows)}\n"
    (RESULTS / "support_matrix.md").write_text(f"# Support matrix\n\n`python benchmarks/support_matrix.py --mode "
                                               f"{args.mode}`\n\n{text}")
    print(text)
    for r in rows:
        if r["status"] == "FAIL":
            print("FAIL", " | ".join(r[f] for f in FACTORS), "->", r["detail"])


if __name__ == "__main__":
    main()
