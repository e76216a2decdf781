"""The GPU part of "Full-parameter 7B training in under 16 GB": Llama-2-7B (random weights, bf16) trained a few steps
with Q-GaLore per layer + leantune memory + checkpointing + chunked loss, with and without the optimizer state on the
host; ``torch.cuda.max_memory_allocated`` next to ``leantune plan``'s peak, step time, and the INT8 Triton matmul
against its torch reference.

    bash benchmarks/gpu/qgalore_7b.sh          # one H100/H200; writes benchmarks/results/qgalore_7b_cuda.{md,json}

Not run yet: no GPU was lent to the sessions that built it (the CPU runs check the same code paths and the planner).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import leantune  # noqa: E402
from leantune.memory import MemoryConfig  # noqa: E402
from leantune.optim import OptimizerConfig, build_optimizer  # noqa: E402
from leantune.plan import build_model, config_from, plan  # noqa: E402

OPTIMIZER = "q_galore_adamw8bit:rank=1024,layerwise=true"
MEMORY = "leantune+checkpointing+chunked_loss"


def int8_matmul_check() -> dict:
    """Triton vs torch reference on a 7B MLP shape: max relative error and time of each."""
    from leantune.kernels import dispatch
    from leantune.kernels.int8_linear import int8_matmul
    from leantune.kernels.quantize import quantize

    w = torch.randn(11008, 4096, device="cuda") * 0.02
    codes, scales = quantize(w, 8, 256, per_row=True)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    out = {}
    for label, enabled in (("triton", None), ("torch", False)):
        dispatch.set_enabled(enabled)
        y = int8_matmul(x, codes, scales, 256, transpose=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            int8_matmul(x, codes, scales, 256, transpose=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[label] = (y.float(), statistics.median(times))
    dispatch.set_enabled(None)
    err = float((out["triton"][0] - out["torch"][0]).abs().max() / out["torch"][0].abs().max())
    return {"rel_err": err, "triton_ms": out["triton"][1] * 1e3, "torch_ms": out["torch"][1] * 1e3}


def train(offload: bool, seq: int, steps: int) -> dict:
    torch.cuda.empty_cache()
    model = build_model(config_from("llama-2-7b"), torch.bfloat16, "CAUSAL_LM", "cuda")
    leantune.memory.apply(model, MemoryConfig(chunked_loss=True))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    name, _, opts = OPTIMIZER.partition(":")
    options = dict(kv.split("=") for kv in opts.split(","))
    opt = build_optimizer(model, OptimizerConfig(name, rank=int(options["rank"]), layerwise=True, lr=1e-4,
                                                 offload="cpu" if offload else None))
    torch.cuda.reset_peak_memory_stats()  # from here on: the INT8 model (the bf16 one it was made from is gone)
    ids = torch.randint(0, 32000, (1, seq), device="cuda")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    predicted = plan("llama-2-7b", seq=seq, batch=1, optimizer=OPTIMIZER, memory=MEMORY, offload_optimizer=offload)
    result = {"offload": offload, "measured_peak_gb": torch.cuda.max_memory_allocated() / 1e9,
              "predicted_peak_gb": predicted.peak / 1e9, "step_s": statistics.median(times[1:])}
    del model, opt
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/qgalore_7b_cuda"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    kernel = int8_matmul_check()
    rows = [train(offload, args.seq, args.steps) for offload in (False, True)]
    lines = [f"{torch.cuda.get_device_name()}: Llama-2-7B (random init, bf16), seq {args.seq}, batch 1, {OPTIMIZER}, "
             f"{MEMORY}", "", "| optimizer state | measured peak GB | plan GB | step s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'host (offload)' if r['offload'] else 'GPU'} | {r['measured_peak_gb']:.2f} | "
                     f"{r['predicted_peak_gb']:.2f} | {r['step_s']:.2f} |")
    lines += ["", f"INT8 matmul 2048×4096 · (11008×4096)ᵀ: Triton {kernel['triton_ms']:.2f} ms, torch reference "
              f"{kernel['torch_ms']:.2f} ms, max relative difference {kernel['rel_err']:.1e}"]
    print("\n".join(lines))
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": rows, "int8_matmul": kernel}, indent=2))


if __name__ == "__main__":
    main()
