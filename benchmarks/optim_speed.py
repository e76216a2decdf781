"""Optimizer step time: (b) each optimizer step against its unavoidable matrix products, (a) the full training step
against torch AdamW, and the projector refresh (DCT vs SVD). Medians and spreads of interleaved rounds, one run.

(b) ``--part step``: the 7 weight matrices of one Llama layer at d=1024, ffn 2752, rank 256, refresh excluded
    (T larger than the run; its cost is in (a)). Each round times every optimizer's step and, right after, the
    same GEMMs it cannot avoid, on the same shapes and memory layouts (GaLore family: project + back-project;
    DCT-Fira (α = 1): + back-projection of R (Fira at its default α = 0.25 needs none: fira.py merges its residual
    into GaLore's products); Natural GaLore: + its Woodbury products with s = 4; APOLLO: project only;
    Conda: rotate G and M, rotate back; AdamW: none).
(a) ``--part train``: Llama d=1024, 4 layers, seq 512, batch 4 (vocab 32000), forward + backward + optimizer step,
    rank 256, refresh every 200 steps amortised (one refresh of every projector, timed, / 200).
``--part refresh``: one 4096 x 4096 gradient, exact fp32 SVD vs DCT.
``--part profile``: where (b)'s step time goes, by kind of op (matrix products / bitsandbytes / the rest).

    python benchmarks/optim_speed.py --part step --rounds 7
    python benchmarks/optim_speed.py --part train --rounds 3       # 3 timed steps per optimizer and round
    python benchmarks/optim_speed.py --part profile
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from leantune.optim import OptimizerConfig, build_optimizer

D, F, RANK = 1024, 2752, 256
SHAPES = [(D, D)] * 4 + [(F, D), (F, D), (D, F)]
# label -> (OptimizerConfig name or None for torch/bnb AdamW, config extras, GEMM kind)
OPTIMIZERS: dict[str, tuple[str | None, dict, str]] = {
    "AdamW (torch, foreach)": (None, {}, "none"),
    "8-bit AdamW (bitsandbytes)": ("bnb", {}, "none"),
    "GaLore": ("galore_adamw", {}, "galore"),
    "8-bit GaLore": ("galore_adamw8bit", {}, "galore"),
    "GaLore-Adafactor": ("galore_adafactor", {}, "galore"),
    "Fira": ("fira_adamw", {}, "galore"),  # α = 0.25: residual merged, no back(R) product (FiraAdamW.add_update)
    "DCT-AdamW": ("dct_adamw", {}, "galore"),
    "DCT-Fira": ("dct_fira_adamw", {}, "fira"),
    "rSVD GaLore": ("rsvd_galore_adamw", {}, "galore"),
    "Natural GaLore": ("natural_galore_adamw", {}, "natural"),
    "APOLLO": ("apollo_adamw", {}, "apollo"),
    "APOLLO-Mini": ("apollo_mini", {}, "apollo-mini"),
    "Conda": ("conda_adamw", {}, "conda"),
    "GradNormLoRP": ("gradnorm_lorp", {}, "galore"),
    "8-bit GradNormLoRP": ("gradnorm_lorp8bit", {}, "galore"),
}


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mats = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in SHAPES)


def build(label: str, model: nn.Module, gap: int) -> torch.optim.Optimizer:
    name, extra, _ = OPTIMIZERS[label]
    if name is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    if name == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    from leantune.optim import OPTIMIZERS as SPECS

    spec = SPECS[name]
    rank = {} if spec.rank is None or spec.fixed_rank else {"rank": RANK}
    return build_optimizer(model, OptimizerConfig(name, update_proj_gap=gap, lr=1e-3, **rank, **extra))


def gemms(kind: str, mats: list[torch.Tensor]) -> Callable[[], None]:
    """The matrix products the optimizer of ``kind`` cannot avoid, on the same shapes and layouts."""
    work = []
    for W in mats:
        m, n = W.shape
        G = torch.randn_like(W)
        right = m >= n
        if kind in ("galore", "fira", "apollo", "apollo-mini", "natural"):
            r = 1 if kind == "apollo-mini" else RANK
            P = torch.randn(r, n) if right else torch.randn(m, r)
            N = torch.randn(m, r) if right else torch.randn(r, n)
            work.append((kind, G, P, N, W))
        elif kind == "conda":
            k = min(m, n)
            work.append((kind, G, torch.randn(k, k), torch.randn_like(W), W))

    def run() -> None:
        for kind, G, P, N, W in work:
            right = G.shape[0] >= G.shape[1]
            if kind == "conda":
                Q = P
                a, b = (G @ Q.t(), N @ Q.t()) if right else (Q.t() @ G, Q.t() @ N)
                (a @ Q) if right else (Q @ a)
                continue
            R = G @ P.t() if right else P.t() @ G
            if kind.startswith("apollo"):
                continue
            W.addmm_(N, P, alpha=-1e-9) if right else W.addmm_(P, N, alpha=-1e-9)
            if kind == "natural":  # Woodbury with s = 4 past projections: H Hᵀ, H g, Hᵀ z
                H = torch.stack([R.reshape(-1)] * 4)
                H @ H.t(), H @ R.reshape(-1), H.t() @ torch.ones(4)
            if kind == "fira":
                torch.addmm(G, R, P, alpha=-1.0) if right else torch.addmm(G, P, R, alpha=-1.0)

    return run


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(xs: list[float]) -> str:
    return f"{min(xs) * 1e3:.0f}–{max(xs) * 1e3:.0f}"


def part_step(rounds: int, names: list[str]) -> None:
    torch.manual_seed(0)
    setups = {}
    for label in names:
        model = Layer()
        opt = build(label, model, gap=10**6)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # first step: state and projectors created (refresh excluded from the timing)
        setups[label] = (opt, gemms(OPTIMIZERS[label][2], [m.weight.detach().clone() for m in model.mats]))
    steps = {n: [] for n in names}
    mm = {n: [] for n in names}
    for _ in range(rounds):
        for label in names:  # interleaved: every optimizer once per round
            opt, products = setups[label]
            steps[label].append(timed(opt.step))
            if OPTIMIZERS[label][2] != "none":
                mm[label].append(timed(products))
    base = statistics.median(steps[names[0]])
    print(f"\n### (b) Optimizer step vs its unavoidable GEMMs: one Llama layer (d={D}, ffn {F}), rank {RANK}, "
          f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds\n")
    print("| optimizer | step ms (median, min–max) | GEMMs alone ms | step / GEMMs (target ≤ 1.3) | step / AdamW |")
    print("|---|---|---|---|---|")
    for label in names:
        s = statistics.median(steps[label])
        if mm[label]:
            g = statistics.median(mm[label])
            ratio, gemm = f"{s / g:.2f}×", f"{g * 1e3:.1f}"
        else:
            ratio, gemm = "— (no GEMM)", "—"
        print(f"| {label} | {s * 1e3:.1f} ({spread(steps[label])}) | {gemm} | {ratio} | {s / base:.2f}× |")


def llama(seed: int = 0) -> nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=32000, hidden_size=D, intermediate_size=F, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                           tie_word_embeddings=False)
    return T.LlamaForCausalLM(config)


def refresh_seconds(opt: torch.optim.Optimizer) -> float:
    """One refresh of every projector of ``opt`` (what a refresh step adds), timed."""
    from leantune.optim.base import LowRankOptimizer
    from leantune.optim.conda import CondaAdamW
    from leantune.optim.projector_kinds import make_projector

    if not isinstance(opt, LowRankOptimizer):
        return 0.0
    total = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if isinstance(opt, CondaAdamW) and "rank" in group:
                total += timed(lambda: torch.linalg.svd(p.grad.float(), full_matrices=False))
            elif opt.is_low_rank(group, p):
                projector = make_projector(group["projector"], dict(opt.state[p]), group, seed=0)
                source = opt.projection_source(p, p.grad, opt.state[p], group)
                total += timed(lambda: projector.refresh(source, 0))
    return total


def part_train(rounds: int, names: list[str], batch: int, seq: int, gap: int, per_round: int = 1) -> None:
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = {n: [] for n in names}
    refresh = {}
    for r in range(rounds):
        for label in names:
            model = llama()
            opt = build(label, model, gap=10**6)

            def step() -> None:
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=False)

            step()  # warm-up (state, projectors)
            times[label] += [timed(step) for _ in range(per_round)]
            if r == 0:
                model(input_ids=ids, labels=ids).loss.backward()
                refresh[label] = refresh_seconds(opt)
            del model, opt
    base = statistics.median(times[names[0]])
    print(f"\n### (a) Full training step: Llama d={D}, 4 layers, seq {seq}, batch {batch}, rank {RANK}, refresh every "
          f"{gap} steps amortised; {torch.get_num_threads()} threads, median of {rounds} interleaved rounds × "
          f"{per_round} steps\n")
    print("| optimizer | step s (median, min–max) | refresh s (once) | amortised step s | vs AdamW (target ≤ 1.15) |")
    print("|---|---|---|---|---|")
    for label in names:
        s = statistics.median(times[label])
        amortised = s + refresh[label] / gap
        lo, hi = min(times[label]), max(times[label])
        print(f"| {label} | {s:.2f} ({lo:.2f}–{hi:.2f}) | {refresh[label]:.2f} | {amortised:.2f} | "
              f"{amortised / base:.3f}× |")


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::addmv_", "aten::mv")


def part_profile(names: list[str], steps: int = 3) -> None:
    """Where each optimizer's step goes (torch.profiler self times, one Llama layer as in (b)): matrix products,
    bitsandbytes' 8-bit (de)quantization, the other ops (element-wise passes, norms, copies) and the Python of
    ``step()`` itself (the self time of its ``Optimizer.step`` record)."""
    from torch.profiler import ProfilerActivity, profile

    print(f"\n### Where the step goes: self time by kind of op (torch.profiler, {steps} steps, one Llama layer d={D}, "
          f"ffn {F}, rank {RANK}, {torch.get_num_threads()} threads)\n")
    print("| optimizer | step ms (sum of self times) | matrix products | bitsandbytes (de)quantize | element-wise, norms "
          "and other ops | Python in step() | top other ops |")
    print("|---|---|---|---|---|---|---|")
    for label in names:
        torch.manual_seed(0)
        model = Layer()
        opt = build(label, model, gap=10**6)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                opt.step()
        averages = prof.key_averages()
        events = [e for e in averages if not e.key.startswith("Optimizer.step")]
        python = sum(e.self_cpu_time_total for e in averages if e.key.startswith("Optimizer.step")) / 1e3 / steps
        total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps + python
        gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e3 / steps
        bnb = sum(e.self_cpu_time_total for e in events if e.key.startswith("bitsandbytes::")) / 1e3 / steps
        rest = sorted((e for e in events if e.key not in GEMM_OPS and not e.key.startswith("bitsandbytes::")),
                      key=lambda e: -e.self_cpu_time_total)[:3]
        top = ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / 1e3 / steps:.1f}" for e in rest)
        other = total - gemm - bnb - python
        print(f"| {label} | {total:.1f} | {gemm:.1f} ({gemm / total:.0%}) | {bnb:.1f} ({bnb / total:.0%}) | "
              f"{other:.1f} ({other / total:.0%}) | {python:.1f} ({python / total:.0%}) | {top} |")


def part_refresh(d: int) -> None:
    from leantune.optim import DCTProjector, SVDProjector, shared_dct_basis

    G = torch.randn(d, d)
    shared_dct_basis(d, G.dtype, G.device)  # built once per size at init, not per refresh
    dct_t = [timed(lambda: DCTProjector({}, d // 4, 200, 1.0).refresh(G, 0)) for _ in range(3)]
    svd_t = timed(lambda: SVDProjector({}, d // 4, 200, 1.0).refresh(G, 0))
    print(f"\n### Projector refresh at {d} x {d}, rank {d // 4}\n")
    print("| projector | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| exact SVD (torch.linalg.svd, fp32) | {svd_t:.2f} | 1x |")
    print(f"| DCT (matmul + top-r, median of 3) | {statistics.median(dct_t):.2f} | "
          f"{svd_t / statistics.median(dct_t):.1f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["step", "train", "refresh", "profile", "all"], default="step")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", nargs="*", help="optimizer labels (default: all)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--refresh-dim", type=int, default=4096)
    ap.add_argument("--steps-per-round", type=int, default=3, help="timed training steps per optimizer and round")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps_per_round < 1:
        ap.error("--rounds and --steps-per-round must be at least 1")
    names = list(OPTIMIZERS) if not args.only else [n for n in OPTIMIZERS if n in args.only]
    if names[0] != "AdamW (torch, foreach)":
        names.insert(0, "AdamW (torch, foreach)")
    if args.part in ("step", "all"):
        part_step(args.rounds, names)
    if args.part in ("train", "all"):
        part_train(args.rounds, names, args.batch, args.seq, args.gap, args.steps_per_round)
    if args.part in ("profile", "all"):
        part_profile(names)
    if args.part in ("refresh", "all"):
        part_refresh(args.refresh_dim)


if __name__ == "__main__":
    main()
