"""CPU cost of the 2-bit activations: eager GELU vs ReGELU2 with the C kernels vs ReGELU2 with torch ops only.

Forward + backward of one activation at the sizes of the memory benchmark's models, all variants timed in one
process in a shuffled order each round; prints medians (ms) and the median of per-round ratios to eager.

    python benchmarks/cpu_activation.py                # fp32 and bf16, 60 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

from leantune.kernels import cpu_native
from leantune.kernels.activations import regelu2

SHAPES = {"MiniLM GELU input (16x64x1536)": (16, 64, 1536), "Llama-1024 MLP input (2x128x2816)": (2, 128, 2816),
          "7B-like MLP input (1x512x11008)": (1, 512, 11008)}


def step(x0: torch.Tensor, fn) -> None:
    x = x0.detach().requires_grad_()
    y = fn(x)
    y.backward(y.detach())


@contextlib.contextmanager
def c_kernels_off():
    """The documented off switch, set around one call (the backward reads it again, so it wraps the whole step)."""
    old = os.environ.get(cpu_native.ENV_SWITCH)
    os.environ[cpu_native.ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[cpu_native.ENV_SWITCH]
        else:
            os.environ[cpu_native.ENV_SWITCH] = old


def measure(shape, dtype, rounds: int) -> dict[str, tuple[float, float]]:
    x0 = torch.randn(shape, dtype=dtype)

    variants = {"eager GELU": F.gelu, "ReGELU2, C kernels": regelu2, "ReGELU2, torch ops": regelu2}
    if cpu_native.library() is None:
        del variants["ReGELU2, C kernels"]
    times = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0)
    for i in range(rounds + 3):
        shuffle.shuffle(order)
        for name in order:
            with c_kernels_off() if name.endswith("torch ops") else contextlib.nullcontext():
                start = time.perf_counter()
                step(x0, variants[name])
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    base = times["eager GELU"]
    return {name: (statistics.median(t) * 1e3, statistics.median(a / b for a, b in zip(t, base)))
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, C kernels: {'on' if cpu_native.library() else 'unavailable'}\n")
    print("| input | dtype | eager GELU (ms) | ReGELU2, C kernels (ms) | vs eager "
          "| ReGELU2, torch ops (ms) | vs eager |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, shape in SHAPES.items():
        for name in args.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            r = measure(shape, dtype, args.rounds)
            c = r.get("ReGELU2, C kernels", (float("nan"), float("nan")))
            t = r["ReGELU2, torch ops"]
            print(f"| {label} | {name} | {r['eager GELU'][0]:.2f} | {c[0]:.2f} | {c[1]:.2f}x "
                  f"| {t[0]:.2f} | {t[1]:.2f}x |")


if __name__ == "__main__":
    main()
