"""Pretraining comparison of every optimizer on one tiny Llama: final loss (mean ± std over seeds), optimizer state
bytes, step time, steps to reach AdamW's final loss, and the loss curves.

Model: Llama d=128, 4 layers, ffn 344, 4 heads. Data: ``--data text`` (default) is real English text shipped in a
PyPI package (see ``recipes/common.py::load_pretraining_text``), byte-level tokens (vocab 256), sequences of 64;
``--data bigram`` a fixed random sparse bigram chain (achievable loss = its entropy rate). Every optimizer sees the
same batches in the same order for a given seed; the seed changes the initialisation and the batch order. Low-rank
optimizers project every decoder linear at rank 32 (T 50); the peers Adam-mini and BAdam (``pip install
adam-mini==1.1.1 badam==1.4``, benchmark-only) run with their defaults for this model.

Ranking stability: per seed, the optimizers are ranked by their final loss; the script prints the pairs whose order
changes between seeds (none, or only pairs within one std of each other, means the ranking is stable).

    python benchmarks/optim_pretrain.py [--steps 600] [--seeds 0 1 2] [--data text|bigram]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from leantune.optim import OptimizerConfig, build_optimizer, optimizer_state_bytes  # noqa: E402
from leantune.optim.state_bytes import _tensors  # noqa: E402
from leantune._utils import storage_bytes  # noqa: E402

VOCAB, SEQ, D, LAYERS, HEADS = 256, 64, 128, 4, 4
RESULTS = REPO / "benchmarks" / "results"
LOW = dict(rank=32, update_proj_gap=50)
# label -> OptimizerConfig (or a peer / torch name)
RUNS: dict[str, object] = {
    "AdamW": "adamw",
    "8-bit AdamW": "adamw8bit",
    "GaLore": OptimizerConfig("galore_adamw", **LOW),
    "8-bit GaLore": OptimizerConfig("galore_adamw8bit", **LOW, optimizer_kwargs={"min_8bit_size": 1024}),
    # INT8 weights (stochastic rounding), INT4 lazy projectors: fp32 moments, and the paper's 8-bit moments
    "Q-GaLore": OptimizerConfig("q_galore_adamw", **LOW),
    "Q-GaLore (8-bit moments)": OptimizerConfig("q_galore_adamw8bit", **LOW,
                                                optimizer_kwargs={"min_8bit_size": 1024}),
    "Fira": OptimizerConfig("fira_adamw", **LOW),
    "DCT-AdamW": OptimizerConfig("dct_adamw", **LOW),
    "Natural GaLore": OptimizerConfig("natural_galore_adamw", **LOW),
    "Conda": OptimizerConfig("conda_adamw", update_proj_gap=50, scale=0.25, betas=(0.9, 0.99)),
    "GradNormLoRP": OptimizerConfig("gradnorm_lorp", **LOW),
    "APOLLO": OptimizerConfig("apollo_adamw", **LOW),
    "APOLLO-Mini": OptimizerConfig("apollo_mini", update_proj_gap=50),
    "Adam-mini (peer)": "adam_mini",
    "BAdam (peer)": "badam",
    "SLTrain r=32 δ=0.03 (AdamW)": ("sltrain", "adamw"),
    "LOST r=32 ρ=0.05 (AdamW)": ("lost", "adamw"),
}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bigram_corpus(n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((VOCAB, VOCAB), -1e9)
    succ = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
    logits.scatter_(1, succ, torch.randn(VOCAB, 4, generator=g) * 2)
    probs = logits.softmax(-1)
    x = torch.empty(n_tokens, dtype=torch.long)
    x[0] = 0
    for t in range(1, n_tokens):
        x[t] = torch.multinomial(probs[x[t - 1]], 1, generator=g)
    return x, float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())


def text_corpus() -> tuple[torch.Tensor, str]:
    from recipes.common import load_pretraining_text

    text, source = load_pretraining_text()
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long), source


def batches(tokens: torch.Tensor, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of random windows (training part: the first 90% of the tokens)."""
    g = torch.Generator().manual_seed(1000 + seed)
    limit = int(len(tokens) * 0.9) - SEQ - 1
    starts = torch.randint(0, limit, (steps, batch), generator=g)
    return [torch.stack([tokens[s:s + SEQ] for s in row]) for row in starts]


def make_model(seed: int, parameterization: str | None = None) -> torch.nn.Module:
    """The tiny Llama; with "sltrain" / "lost" its attention and MLP linears are replaced (everything else trains)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=344,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                         max_position_embeddings=SEQ, tie_word_embeddings=False))
    if parameterization is None:
        return model
    from peft import get_peft_model

    import leantune

    if parameterization == "sltrain":
        config = leantune.SLTrainConfig(r=32, lora_alpha=8, sparsity=0.03, seed=seed, target_modules=LINEARS,
                                        train_dense_modules=True)
    else:
        config = leantune.LostConfig(r=32, channel_ratio=0.05, seed=seed, target_modules=LINEARS,
                                     train_dense_modules=True)
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    """Trained numbers, each tensor once (peft's modules_to_save copies replace their originals in training; INT8
    weights train through their float gradient)."""
    from leantune.kernels.int8_linear import is_int8_weight

    return sum(p.numel() for p in model.parameters() if p.requires_grad or is_int8_weight(p))


def make_optimizer(spec: object, model: torch.nn.Module, lr: float, steps: int):
    if isinstance(spec, OptimizerConfig):
        return build_optimizer(model, OptimizerConfig(**{**spec.to_dict(), "lr": lr}))
    if spec == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if spec == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, min_8bit_size=1024)
    if spec == "adam_mini":
        from adam_mini import Adam_mini

        opt = Adam_mini(model.named_parameters(), lr=lr, dim=D, n_heads=HEADS, n_kv_heads=HEADS, verbose=False)
        opt.wv_names = {}  # Adam-mini's advice for runs under 10-20K steps
        return opt
    if spec == "badam":
        from badam import BlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=lr)
        # blocks as BAdam infers them: each decoder layer, the embedding, the head with the rest (norms); with an
        # explicit list of the layers only, the embedding and head would never train (from scratch: loss 4.6)
        return BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=None,
                              switch_block_every=max(steps // (2 * LAYERS), 10), switch_mode="descending",
                              include_embedding=True, include_lm_head=True, verbose=0)
    raise ValueError(spec)


def state_bytes(opt) -> int:
    if hasattr(opt, "shared_state_tensors") or isinstance(opt, torch.optim.AdamW):
        return optimizer_state_bytes(opt)
    inner = getattr(opt, "base_optimizer", opt)  # BAdam wraps AdamW
    return storage_bytes(list(_tensors(dict(inner.state))))


class CountSVDs:
    """Counts ``torch.linalg.svd`` calls while active (every SVD-based projector refresh goes through it)."""

    def __enter__(self):
        self.count, self._svd = 0, torch.linalg.svd

        def counted(*args, **kwargs):
            self.count += 1
            return self._svd(*args, **kwargs)

        torch.linalg.svd = counted
        return self

    def __exit__(self, *exc):
        torch.linalg.svd = self._svd


def run(label: str, spec: object, data: list[torch.Tensor], seed: int, lr: float) -> dict:
    with CountSVDs() as svds:
        result = _run(label, spec, data, seed, lr)
    return {**result, "svds": svds.count}


def _run(label: str, spec: object, data: list[torch.Tensor], seed: int, lr: float) -> dict:
    parameterization, spec = spec if isinstance(spec, tuple) else (None, spec)
    model = make_model(seed, parameterization)
    opt = make_optimizer(spec, model, lr, len(data))
    steps = len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(getattr(opt, "base_optimizer", opt),
                                              lambda s: min(1.0, (s + 1) / (steps // 10)) * max(0.1, 1 - s / steps))
    losses, times, peak_state = [], [], 0
    for s, x in enumerate(tqdm(data, desc=f"{label} seed {seed}", leave=False)):
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if s in (1, steps - 1):
            peak_state = max(peak_state, state_bytes(opt))
    trained = trainable_parameters(model)
    # INT8 weights (Q-GaLore): their codes are parameters, their fp32 block scales buffers
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.numel()) + \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("weight_scale"))
    return {"losses": losses, "step_s": statistics.median(times[2:]), "state_bytes": peak_state,
            "trainable": trained, "memory_bytes": weights + trained * 4 + peak_state}


def smooth(xs: list[float], k: int = 20) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def steps_to(curve: list[float], target: float, k: int = 20) -> int | None:
    """First step where the k-step running mean reaches ``target`` (None if never)."""
    for i, v in enumerate(smooth(curve, k)):
        if i >= k and v <= target:
            return i + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", choices=["text", "bigram"], default="text")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", default=str(RESULTS / "optim_pretrain"))
    args = ap.parse_args()
    report: list[str] = []

    def emit(text: str = "") -> None:  # printed, and written to <out>.md with the command
        print(text)
        report.append(text)
    if args.data == "text":
        tokens, source = text_corpus()
        floor = None
    else:
        tokens, floor = bigram_corpus(200_000)
        source = f"bigram chain (entropy {floor:.3f} nats)"
    labels = [n for n in RUNS if not args.only or n in args.only]
    cache = Path(args.out + "_runs.json")
    done = json.loads(cache.read_text()) if cache.exists() else {}
    for seed in args.seeds:
        data = batches(tokens, args.steps, args.batch, seed)
        for label in labels:
            key = f"{label}|{seed}|{args.steps}|{args.batch}|{args.lr}|{args.data}"
            if key not in done:  # (runs cached before the SVD count was recorded show "—" there)
                done[key] = run(label, RUNS[label], data, seed, args.lr)
                cache.write_text(json.dumps(done))
    result = {label: [done[f"{label}|{s}|{args.steps}|{args.batch}|{args.lr}|{args.data}"] for s in args.seeds]
              for label in labels}
    final = {n: [statistics.fmean(r["losses"][-20:]) for r in rs] for n, rs in result.items()}
    adamw_final = statistics.fmean(final["AdamW"]) if "AdamW" in final else None

    emit(f"\n### Pretraining a tiny Llama (d={D}, {LAYERS} layers) on {source}: {args.steps} steps x batch "
          f"{args.batch} x {SEQ} tokens, lr {args.lr}, seeds {args.seeds}\n")
    emit("| optimizer | final loss (mean ± std, last 20 steps) | trainable params | state KiB | weights + grads + state "
          "KiB | step ms (median) | steps to AdamW's final loss | SVDs |")
    emit("|---|---|---|---|---|---|---|---:|")
    for n, rs in result.items():
        mean, std = statistics.fmean(final[n]), statistics.stdev(final[n]) if len(final[n]) > 1 else 0.0
        reach = [steps_to(r["losses"], adamw_final) for r in rs] if adamw_final else []
        reach_s = "—" if not reach else (" / ".join("never" if x is None else str(x) for x in reach))
        emit(f"| {n} | {mean:.4f} ± {std:.4f} | {rs[0]['trainable']:,} | "
              f"{statistics.fmean(r['state_bytes'] for r in rs) / 1024:.0f} | "
              f"{statistics.fmean(r['memory_bytes'] for r in rs) / 1024:.0f} | "
              f"{statistics.fmean(r['step_s'] for r in rs) * 1e3:.0f} | {reach_s} | "
              + (f"{statistics.fmean(r['svds'] for r in rs):.0f} |" if all("svds" in r for r in rs) else "— |"))
    if "Conda" in result and "AdamW" in result:
        conda = [steps_to(r["losses"], adamw_final) for r in result["Conda"]]
        adam = [steps_to(r["losses"], adamw_final) for r in result["AdamW"]]
        pairs = [(a / c) for a, c in zip(adam, conda) if a and c]
        verdict = (f"Conda reaches AdamW's final loss in {' / '.join(str(c) for c in conda)} steps against AdamW's "
                   f"{' / '.join(str(a) for a in adam)}: a speed-up of "
                   + (f"{statistics.fmean(pairs):.2f}x" if pairs else "— (not reached)"))
        emit(f"\n{verdict} (the paper claims 2–2.5x on LLaMA pretraining).")
    # ranking stability across seeds
    swaps = []
    for a, b in itertools.combinations(labels, 2):
        order = {final[a][i] < final[b][i] for i in range(len(args.seeds))}
        if len(order) > 1:
            gap = abs(statistics.fmean(final[a]) - statistics.fmean(final[b]))
            within = gap <= max(statistics.stdev(final[a]), statistics.stdev(final[b]))
            swaps.append(f"{a} / {b} ({'within one std' if within else 'NOT within one std'})")
    emit("\nRanking by final loss, per seed: " + ("identical for every seed." if not swaps else
          f"{len(swaps)} pair(s) change order between seeds: " + "; ".join(swaps)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for n, rs in result.items():
        curves = torch.tensor([smooth(r["losses"]) for r in rs])
        mean, std = curves.mean(0), curves.std(0) if len(rs) > 1 else torch.zeros(curves.shape[1])
        ax.plot(mean, label=n, lw=1.2)
        ax.fill_between(range(len(mean)), mean - std, mean + std, alpha=0.15)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=0.8, label="corpus entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats, 20-step mean; band: ± std over seeds)")
    ax.set_title(f"tiny Llama pretraining, {source}")
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"\nplot: {args.out}.png; runs: {cache}")
    command = "python benchmarks/optim_pretrain.py " + " ".join(
        f'"{a}"' if " " in a else a for a in sys.argv[1:])
    Path(args.out + ".md").write_text(f"Command: `{command}`\n" + "\n".join(report) + "\n")


if __name__ == "__main__":
    main()
