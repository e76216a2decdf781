"""Optimizer-state bytes of the low-rank optimizers on the GaLore paper's Llama shapes, and gradient memory
with/without per-layer updates.

State bytes are measured from the storages the optimizer keeps alive (leantune.optim.optimizer_state_bytes:
dedupe by untyped storage, a view costs its whole base).  Method: one real optimizer step on one decoder layer's
seven linear weights (q,k,v,o: d x d; gate, up: f x d; down: d x f) with random gradients, for 60M and 130M; for
350M and 1B the layer is built the same way (real tensors, one step) unless --skip-large.  Whole-target numbers
= per-layer bytes x layers.  Embeddings / lm_head / norms are not targeted (plain AdamW in every method) and are
reported separately.

    python benchmarks/optim_memory.py [--sizes 60M 130M] [--skip-large]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn
from tqdm import tqdm

from leantune.optim import (APOLLOAdamW, APOLLOMini, CondaAdamW, FiraAdamW, GaLoreAdamW, GaLoreAdamW8bit,
                            GradNormLoRPAdamW, GradNormLoRPAdamW8bit, NaturalGaLoreAdamW, optimizer_state_bytes,
                            storage_bytes)
from leantune.optim.state_bytes import _tensors

SHAPES = {  # GaLore paper Table 5: d, ffn, layers
    "60M": (512, 1376, 8),
    "130M": (768, 2048, 12),
    "350M": (1024, 2736, 24),
    "1B": (2048, 5461, 32),
}
VOCAB = 32000


def layer_weights(d: int, f: int) -> list[nn.Parameter]:
    shapes = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    ps = [nn.Parameter(torch.randn(*s) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def build(method: str, ps: list[nn.Parameter], rank: int):
    low = [{"params": ps, "rank": rank, "update_proj_gap": 200, "scale": 0.25}]
    if method == "AdamW":
        return torch.optim.AdamW(ps, lr=1e-3)
    if method == "8-bit AdamW":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(ps, lr=1e-3)
    if method == "galore-torch 1.0":
        import galore_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return galore_torch.GaLoreAdamW([{**low[0], "proj_type": "std"}], lr=1e-3)
    if method == "GaLore":
        return GaLoreAdamW(low, lr=1e-3)
    if method == "8-bit GaLore":
        return GaLoreAdamW8bit(low, lr=1e-3)
    if method == "Fira":
        return FiraAdamW(low, lr=1e-3)
    if method == "Natural GaLore (s=4)":
        return NaturalGaLoreAdamW(low, lr=1e-3, history_size=4)
    if method == "DCT":
        return GaLoreAdamW([{**low[0], "projector": "dct", "scale": 1.0}], lr=1e-3)
    if method == "APOLLO":
        return APOLLOAdamW([{**low[0], "scale": 1.0}], lr=1e-3)
    if method == "APOLLO-Mini":
        return APOLLOMini([{"params": ps, "rank": 1}], lr=1e-3)
    if method == "apollo-torch 1.0.3 (Mini)":
        import apollo_torch

        return apollo_torch.APOLLOAdamW([{"params": ps, "rank": 1, "proj": "random", "scale_type": "tensor",
                                          "scale": 128.0, "update_proj_gap": 200, "proj_type": "std"}], lr=1e-3)
    if method == "Conda":
        return CondaAdamW([{"params": ps, "rank": None}], lr=1e-3)
    if method == "GradNormLoRP":
        return GradNormLoRPAdamW(low, lr=1e-3)
    if method == "8-bit GradNormLoRP":
        return GradNormLoRPAdamW8bit(low, lr=1e-3)
    raise ValueError(method)


def state_bytes(opt) -> int:
    if hasattr(opt, "shared_state_tensors") or isinstance(opt, torch.optim.AdamW):
        return optimizer_state_bytes(opt)
    return storage_bytes(list(_tensors(dict(opt.state))))  # bnb / galore-torch (projector objects traversed)


def formula_bytes(method: str, d: int, f: int, r: int) -> float:
    """Paper formulas (elements x bytes) for one layer: Adam 2mn; GaLore mr + 2nr (m <= n); 8-bit: 2nr (1+4/256);
    APOLLO 2nr + 2 and APOLLO-Mini 2n + 2 (P regenerated from its seed, paper accounting); apollo-torch keeps P:
    2n + m + 1; Conda 2mn + m²; GradNormLoRP GaLore + 4 per output row (g, ‖V‖ and g's two moments)."""
    total = 0.0
    for (m, n), out in zip([(d, d)] * 4 + [(d, f)] * 3, [d] * 4 + [f, f, d]):  # m = min side, n = max side
        if method in ("AdamW",):
            total += 2 * m * n * 4
        elif method == "8-bit AdamW":
            total += 2 * m * n * (1 + 4 / 256)
        elif method in ("GaLore", "galore-torch 1.0", "Fira"):
            total += (m * r + 2 * n * r) * 4
        elif method == "8-bit GaLore":
            total += m * r * 4 + 2 * n * r * (1 + 4 / 256)
        elif method == "Natural GaLore (s=4)":
            total += (m * r + 2 * n * r + 4 * n * r) * 4
        elif method == "DCT":
            total += 2 * n * r * 4 + r * 4
        elif method == "APOLLO":
            total += (2 * n * r + 2) * 4
        elif method == "APOLLO-Mini":
            total += (2 * n + 2) * 4
        elif method == "apollo-torch 1.0.3 (Mini)":
            total += (2 * n + m + 1) * 4
        elif method == "Conda":
            total += (2 * m * n + m * m) * 4
        elif method == "GradNormLoRP":
            total += (m * r + 2 * n * r + 4 * out) * 4
        elif method == "8-bit GradNormLoRP":
            total += m * r * 4 + 2 * n * r * (1 + 4 / 256) + 4 * out * 4
    return total


METHODS = ["AdamW", "8-bit AdamW", "galore-torch 1.0", "GaLore", "8-bit GaLore", "Fira", "Natural GaLore (s=4)", "DCT",
           "APOLLO", "APOLLO-Mini", "apollo-torch 1.0.3 (Mini)", "Conda", "GradNormLoRP", "8-bit GradNormLoRP"]


def gradient_peak(layerwise: bool) -> tuple[int, int]:
    """Peak bytes of live .grad storages during one backward of a tiny Llama (hooks sample after each grad)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=4))
    peak = [0]

    def sample(_p):
        peak[0] = max(peak[0], storage_bytes([q.grad for q in model.parameters() if q.grad is not None]))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(sample)  # registered first: samples before the optimizer frees it
    opt = build_optimizer(model, OptimizerConfig(rank=64, layerwise=layerwise, lr=1e-3))
    x = torch.randint(0, 2048, (2, 64))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    return peak[0], sum(p.numel() * 4 for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES))
    ap.add_argument("--skip-large", action="store_true", help="skip 350M/1B")
    args = ap.parse_args()
    sizes = [s for s in args.sizes if not (args.skip_large and s in ("350M", "1B"))]
    rows = []
    for size in sizes:
        d, f, layers = SHAPES[size]
        r = d // 4
        base = None
        for method in tqdm(METHODS, desc=f"{size} r={r}"):
            ps = layer_weights(d, f)
            opt = build(method, ps, r)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            # shared tensors (one DCT basis per size) are counted once, not once per layer
            shared = storage_bytes(opt.shared_state_tensors()) if hasattr(opt, "shared_state_tensors") else 0
            b = (state_bytes(opt) - shared) * layers + shared
            base = b if method == "AdamW" else base
            rows.append((size, r, method, b, b / base, formula_bytes(method, d, f, r) * layers / (2 * layers * sum(
                m * n for m, n in [(d, d)] * 4 + [(d, f)] * 3) * 4)))
            del opt, ps
    print("\n### Optimizer state of the targeted linear weights (all decoder layers), rank d/4\n")
    print("| model | rank | method | measured MiB | measured / AdamW | paper formula / AdamW |")
    print("|---|---|---|---|---|---|")
    for size, r, method, b, ratio, formula in rows:
        print(f"| {size} | {r} | {method} | {b / 2**20:.1f} | {ratio:.1%} | {formula:.1%} |")
    print("\nNot targeted (plain AdamW state in every method): embeddings + lm_head = "
          + ", ".join(f"{s}: {2 * 2 * VOCAB * SHAPES[s][0] * 4 / 2**20:.0f} MiB" for s in sizes))
    print("\n### Peak live gradient bytes during backward (tiny Llama d=256, 6 layers, CPU)\n")
    print("| mode | peak gradient MiB | all weights MiB |")
    print("|---|---|---|")
    for lw in (False, True):
        peak, total = gradient_peak(lw)
        print(f"| {'per-layer (layerwise=True)' if lw else 'standard'} | {peak / 2**20:.2f} | {total / 2**20:.2f} |")


if __name__ == "__main__":
    main()
