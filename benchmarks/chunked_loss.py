"""The chunked LM-head loss against transformers' unfused loss: the loss's peak extra memory and time, and a whole
training step, interleaved in one run (``MemoryConfig(chunked_loss=True)``, ``leantune.kernels.chunked_loss``).

    python benchmarks/chunked_loss.py                       # writes benchmarks/results/chunked_loss.md

(a) the loss alone — lm_head + cross-entropy, forward and backward, frozen head (LoRA elsewhere): N tokens × hidden H
    × vocab V (default Llama-3's V = 128,256, N = 4,096, H = 512 to fit a CPU run); peak bytes above the inputs
    (``leantune.memory.peak_bytes``, a live-storage counter) as a fraction of the fp32 logits (N·V·4), and time;
(b) a whole LoRA training step of a Llama model with that vocabulary, chunked vs unfused: step time and peak.
Timings are medians of interleaved rounds on this machine (2 CPU cores), min–max in parentheses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import leantune.memory as lm  # noqa: E402
from leantune.kernels.chunked_loss import chunked_head_loss, default_chunk  # noqa: E402
from leantune.memory.peak import peak_bytes  # noqa: E402


def _median(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f}–{max(times):.3f})"


def loss_alone(n: int, h: int, v: int, dtype: torch.dtype, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False).to(dtype).requires_grad_(False)
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def unfused():
        F.cross_entropy(head(x).float(), y).backward()  # transformers' ForCausalLMLoss: upcast, mean
        x.grad = None

    def chunked():
        chunked_head_loss(x, y, head, vocab_size=v).backward()
        x.grad = None

    runs = {"unfused (transformers)": unfused, "chunked (leantune)": chunked}
    base = [head.weight, x, y]
    peaks = {name: peak_bytes(fn, base) for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    logits = n * v * 4
    ref = statistics.median(times["unfused (transformers)"])
    return [dict(what=name, dtype=str(dtype).replace("torch.", ""), peak=peaks[name] / 2**20,
                 of_logits=peaks[name] / logits, time=_median(times[name]),
                 ratio=statistics.median(times[name]) / ref) for name in runs]


def training_step(v: int, seq: int, batch: int, dtype: torch.dtype, rounds: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    models = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=v, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=8)
        model = get_peft_model(LlamaForCausalLM(config).to(dtype),
                               LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0),
                               autocast_adapter_dtype=False).train()
        lm.apply(model, lm.MemoryConfig(chunked_loss=chunked))
        models["chunked (leantune)" if chunked else "unfused (transformers)"] = model
    ids = torch.randint(0, v, (batch, seq))

    def step(model):
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in models}
    peaks = {}
    for name, model in models.items():
        step(model)  # warm up
        peaks[name] = peak_bytes(lambda m=model: step(m), list(model.parameters()) + list(model.buffers()))
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - start)
    ref = statistics.median(times["unfused (transformers)"])
    for name in models:
        rows.append(dict(what=name, dtype=str(dtype).replace("torch.", ""), peak=peaks[name] / 2**20,
                         of_logits=float("nan"), time=_median(times[name]),
                         ratio=statistics.median(times[name]) / ref))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-seq", type=int, default=512)
    parser.add_argument("--step-batch", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "chunked_loss.md"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    chunk = default_chunk(args.tokens, args.vocab, args.hidden, floor=256)
    lines = ["# Chunked LM-head loss\n", f"Command: `python benchmarks/chunked_loss.py` (defaults: {args.tokens} tokens, "
             f"hidden {args.hidden}, vocab {args.vocab}, {args.rounds} interleaved rounds; {torch.get_num_threads()} "
             f"threads; chunk {chunk} tokens)\n",
             "## (a) lm_head + cross-entropy, forward and backward (frozen head)\n",
             "| loss | dtype | peak above inputs MiB | of the fp32 logits | time s (median, min–max) | time vs unfused |",
             "|---|---|---:|---:|---|---:|"]
    for dtype in (torch.float32, torch.bfloat16):
        for row in loss_alone(args.tokens, args.hidden, args.vocab, dtype, args.rounds):
            lines.append(f"| {row['what']} | {row['dtype']} | {row['peak']:.1f} | {row['of_logits']:.3f} | "
                         f"{row['time']} | {row['ratio']:.2f}× |")
    lines += ["", f"## (b) a LoRA training step: Llama d=512, 6 layers, vocab {args.vocab}, seq {args.step_seq} × "
                  f"batch {args.step_batch}, bf16, leantune memory on\n",
              "| loss | dtype | step peak above weights MiB | step s (median, min–max) | step vs unfused |",
              "|---|---|---:|---|---:|"]
    for row in training_step(args.vocab, args.step_seq, args.step_batch, torch.bfloat16, args.rounds):
        lines.append(f"| {row['what']} | {row['dtype']} | {row['peak']:.1f} | {row['time']} | {row['ratio']:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
