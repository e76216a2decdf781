"""Optimizer step time relative to AdamW (medians, one run) and projector refresh time: DCT vs exact SVD.

Step time: one decoder layer of the GaLore 60M shapes (7 linear weights, rank 128), refresh steps excluded
(update_proj_gap larger than the run), median over --steps steps after 2 warm-up steps.
Refresh: one 4096 x 4096 gradient, exact fp32 torch.linalg.svd vs DCT (matmul with the shared basis + top-r).

    python benchmarks/optim_speed.py [--steps 10] [--refresh-dim 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from leantune.optim import DCTProjector, FiraAdamW, GaLoreAdamW, GaLoreAdamW8bit, SVDProjector, shared_dct_basis


def layer(d=512, f=1376):
    ps = [nn.Parameter(torch.randn(*s) * 0.02) for s in [(d, d)] * 4 + [(f, d), (f, d), (d, f)]]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def make(name, ps):
    low = [{"params": ps, "rank": 128, "update_proj_gap": 10_000, "scale": 0.25}]
    return {
        "AdamW (torch, foreach)": lambda: torch.optim.AdamW(ps, lr=1e-3),
        "GaLore": lambda: GaLoreAdamW(low, lr=1e-3),
        "8-bit GaLore": lambda: GaLoreAdamW8bit(low, lr=1e-3),
        "Fira": lambda: FiraAdamW(low, lr=1e-3),
        "DCT": lambda: GaLoreAdamW([{**low[0], "projector": "dct"}], lr=1e-3),
    }[name]()


def step_median(name, steps):
    ps = layer()
    opt = make(name, ps)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--refresh-dim", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    names = ["AdamW (torch, foreach)", "GaLore", "8-bit GaLore", "Fira", "DCT"]
    med = {n: step_median(n, args.steps) for n in names}
    print(f"\n### Step time, one 60M decoder layer, rank 128, {torch.get_num_threads()} threads (median of {args.steps})\n")
    print("| optimizer | median step ms | relative to AdamW |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n] * 1e3:.1f} | {med[n] / med[names[0]]:.2f}x |")

    d = args.refresh_dim
    G = torch.randn(d, d)
    shared_dct_basis(d, G.dtype, G.device)  # built once per size at init, not per refresh
    dct_t = []
    for _ in range(3):
        t = time.perf_counter()
        DCTProjector({}, d // 4, 200, 1.0).refresh(G, 0)
        dct_t.append(time.perf_counter() - t)
    t = time.perf_counter()
    SVDProjector({}, d // 4, 200, 1.0).refresh(G, 0)
    svd_t = time.perf_counter() - t
    print(f"\n### Projector refresh at {d} x {d}, rank {d // 4}\n")
    print("| projector | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| exact SVD (torch.linalg.svd, fp32) | {svd_t:.2f} | 1x |")
    print(f"| DCT (matmul + top-r, median of 3) | {statistics.median(dct_t):.2f} | {svd_t / statistics.median(dct_t):.1f}x |")


if __name__ == "__main__":
    main()
