"""Short pretraining run of a tiny Llama on a generated corpus: loss curves of AdamW, GaLore, Fira, DCT.

Corpus: token sequences from a fixed random sparse bigram Markov chain (each token has 4 likely successors), so
the achievable loss is the chain's entropy rate (printed).  Same data, init and lr schedule for every optimizer.

    python benchmarks/optim_pretrain.py [--steps 150] [--out benchmarks/results/optim_pretrain.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from leantune.optim import OptimizerConfig, build_optimizer  # noqa: E402

VOCAB = 256


def corpus(n_seq: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((VOCAB, VOCAB), -1e9)
    succ = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
    logits.scatter_(1, succ, torch.randn(VOCAB, 4, generator=g) * 2)
    probs = logits.softmax(-1)
    x = torch.empty(n_seq, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n_seq,), generator=g)
    for t in range(1, seq):
        x[:, t] = torch.multinomial(probs[x[:, t - 1]], 1, generator=g).squeeze(1)
    stationary_entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    return x, stationary_entropy


def run(name: str, config, data: torch.Tensor, steps: int, batch: int, lr: float) -> list[float]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    if config is None:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = build_optimizer(model, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    losses = []
    for s in tqdm(range(steps), desc=name):
        x = data[(s * batch) % len(data):][:batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="benchmarks/results/optim_pretrain.png")
    args = ap.parse_args()
    data, entropy = corpus(args.steps * args.batch, 48)
    low = dict(rank=32, update_proj_gap=50, lr=args.lr)
    runs = {
        "AdamW": None,
        "GaLore (r=32, a=0.25)": OptimizerConfig(name="galore_adamw", scale=0.25, **low),
        "Fira (r=32, a=0.25)": OptimizerConfig(name="fira_adamw", scale=0.25, **low),
        "DCT (r=32, a=0.25)": OptimizerConfig(name="dct_adamw", scale=0.25, **low),
    }
    curves = {n: run(n, c, data, args.steps, args.batch, args.lr) for n, c in runs.items()}
    print(f"\n### Tiny Llama (d=128, 4 layers) pretraining, {args.steps} steps, lr {args.lr}; "
          f"bigram entropy {entropy:.3f} nats\n")
    print("| optimizer | loss @ step 1 | mean loss last 10 steps |")
    print("|---|---|---|")
    for n, c in curves.items():
        print(f"| {n} | {c[0]:.3f} | {sum(c[-10:]) / 10:.3f} |")
    plt.figure(figsize=(7, 4))
    for n, c in curves.items():
        plt.plot(c, label=n)
    plt.axhline(entropy, color="k", ls="--", lw=0.8, label="corpus entropy")
    plt.xlabel("step")
    plt.ylabel("train loss (nats)")
    plt.legend()
    plt.tight_layout()
    plt.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
