"""How much of the 4-bit quantization error a LoftQ initialisation removes, on the real pretrained MiniLM.

For every linear weight W of all-MiniLM-L6-v2 (36 matrices, 384×384 / 1536×384 / 384×1536) and each 4-bit quantizer
(bitsandbytes NF4 block 64 — QLoRA's base — and round-to-nearest int4 min/max per group of 64): the relative error
‖W − Q‖_F / ‖W‖_F of the plain quantized base (what QLoRA starts from) against ‖W − Q_T − L_T R_T‖_F / ‖W‖_F after
T = 1…5 LoftQ alternations (``leantune.adapters.loftq``) at rank r, as the median over the matrices (min–max in
brackets).

    python benchmarks/loftq_init.py            # ~1 min on 2 CPU cores

Prints a markdown table; writes benchmarks/results/loftq_init.{md,png}.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

from leantune.adapters.loftq import loftq, quantizer  # noqa: E402
from recipes.common import minilm_path  # noqa: E402

RANKS = (8, 16, 64)
ITERS = 5


def weights() -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path())
    return {n: m.weight.detach().float() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "pooler" not in n}


def main() -> None:
    mats = weights()
    rows = []
    curves = {}
    for quant in ("nf4", "int4"):
        for rank in RANKS:
            per_matrix = [loftq(w, rank, quantizer(quant), iters=ITERS).errors for w in mats.values()]
            columns = list(zip(*per_matrix))  # columns[t]: every matrix's error after t alternations
            medians = [statistics.median(c) for c in columns]
            curves[(quant, rank)] = medians
            cells = [f"{statistics.median(c):.4f} [{min(c):.4f}–{max(c):.4f}]" for c in (columns[0], columns[1],
                                                                                       columns[-1])]
            removed = 1 - medians[-1] / medians[0]
            rows.append(f"| {quant} | {rank} | {cells[0]} | {cells[1]} | {cells[2]} | {removed:.1%} |")
    header = ("| 4-bit quantizer | rank r | plain Q(W) (QLoRA's start) | LoftQ T=1 | LoftQ T=5 "
              "| error removed (T=5) |\n|---|---:|---:|---:|---:|---:|")
    table = header + "\n" + "\n".join(rows)
    text = (f"Relative error ‖W − base − ΔW‖_F / ‖W‖_F over the {len(mats)} linear weights of the real "
            f"all-MiniLM-L6-v2 (median [min–max]); `python benchmarks/loftq_init.py`.\n\n{table}\n")
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loftq_init.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (quant, rank), medians in curves.items():
        ax.plot(range(len(medians)), medians, marker="o", linestyle="-" if quant == "nf4" else "--",
                label=f"{quant}, r={rank}")
    ax.set_xlabel("LoftQ alternations T (0 = plain quantization)")
    ax.set_ylabel("median ‖W − Q − LR‖ / ‖W‖")
    ax.set_title("MiniLM: 4-bit error left at the start of training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "loftq_init.png", dpi=120)


if __name__ == "__main__":
    main()
