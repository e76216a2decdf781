"""Benchmark leantune's Triton kernels against eager torch and torch.compile at Llama-7B-like shapes.

For each kernel: median time of forward and forward+backward (the optimizer step has only "step"), and the peak
CUDA memory of forward+backward above the inputs. Prints one markdown table, writes
``benchmarks/results/kernels.md`` and ``benchmarks/results/kernels.png``.

    python benchmarks/kernel_speed.py                     # bf16, 4096 tokens, hidden 4096, ffn 11008, LoRA r 16
    python benchmarks/kernel_speed.py --tokens 8192 --rank 64

Needs a CUDA GPU; on a CPU-only machine it says so and exits 0 (the kernels' CPU path is the torch reference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _cases(args: argparse.Namespace) -> dict[str, dict[str, Callable]]:
    """{kernel: {"triton"|"eager"|"compile": make() -> (forward fn, inputs needing grad)}}."""
    from leantune.kernels import activations, gated_mlp, lora_linear, norms, optimizer_step, set_enabled

    dev, dt = args.device, getattr(torch, args.dtype)
    m, h, f, r = args.tokens, args.hidden, args.ffn, args.rank

    def backend(fn, use_triton):
        """``fn`` with the dispatch rule on (Triton for these CUDA tensors) or off (the torch reference)."""
        def run(*inputs):
            set_enabled(None if use_triton else False)
            try:
                return fn(*inputs)
            finally:
                set_enabled(None)
        return run

    def act(kind, use_triton):
        return backend(lambda x: activations.ApproxActivationFunction.apply(x, kind, "none"), use_triton)

    def norm(kind, use_triton):
        return backend(lambda x: norms.MSNormFunction.apply(x, 1e-6, kind), use_triton)

    def gated(use_triton):
        return backend(lambda e, g: gated_mlp.GatedActivationFunction.apply(e, g, "silu"), use_triton)

    w = torch.randn(h, h, device=dev, dtype=dt) / h**0.5
    lora_a = (torch.randn(r, h, device=dev, dtype=dt) / h**0.5).requires_grad_()
    lora_b = (torch.randn(h, r, device=dev, dtype=dt) / r**0.5).requires_grad_()

    def lora(use_triton):
        if use_triton:
            return lambda x: lora_linear.FusedLoRALinearFunction.apply(x, w, None, lora_a, lora_b, 2.0)
        return lambda x: lora_linear.reference_lora_linear(x, w, None, lora_a, lora_b, 2.0)

    wide = lambda: torch.randn(m, f, device=dev, dtype=dt).requires_grad_()  # noqa: E731
    narrow = lambda: torch.randn(m, h, device=dev, dtype=dt).requires_grad_()  # noqa: E731
    cases = {}
    for kind in ("regelu2", "resilu2"):
        cases[kind] = (act(kind, True), act(kind, False), lambda: (wide(),))
    cases["ms_rmsnorm"] = (norm("rmsnorm", True), norm("rmsnorm", False), lambda: (narrow(),))
    cases["ms_layernorm"] = (norm("layernorm", True), norm("layernorm", False), lambda: (narrow(),))
    cases["gated_mlp (SwiGLU)"] = (gated(True), gated(False), lambda: (wide(), wide()))
    cases["lora_linear"] = (lora(True), lora(False), lambda: (narrow(),))

    p = torch.randn(h, f, device=dev, dtype=torch.float32)
    grad = torch.randn(h, f, device=dev, dtype=torch.float32)
    proj = torch.linalg.qr(torch.randn(h, args.galore_rank, device=dev))[0].contiguous()  # left side, m < n
    states = [torch.zeros(args.galore_rank, f, device=dev) for _ in range(2)]
    kw = dict(step=10, lr=1e-3, scale=0.25, side="left", weight_decay=0.0)
    tri = lambda: optimizer_step.triton_galore_adam_step(p, grad, proj, *states, **kw)  # noqa: E731
    ref = lambda: optimizer_step.reference_galore_adam_step(p, grad, proj, *states, **kw)  # noqa: E731
    cases["galore_adam_step"] = (tri, ref, None)
    return cases


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, (tri, eager, make_inputs) in _cases(args).items():
        if make_inputs is None:  # optimizer step: no autograd
            impls = {"triton": tri, "eager": eager, "compile": torch.compile(eager)}
            for impl, fn in impls.items():
                rows.append(dict(kernel=name, impl=impl, fwd=_time_ms(fn, args.repeats), bwd=float("nan"),
                                 mem=_peak_mib(fn)))  # fmt: skip
            continue
        impls = {"triton": tri, "eager": eager, "compile": torch.compile(eager)}
        for impl, fn in impls.items():
            inputs = make_inputs()
            out = fn(*inputs)
            dy = torch.randn_like(out)

            def fwd(fn=fn, inputs=inputs):
                with torch.no_grad():
                    fn(*inputs)

            def fwd_bwd(fn=fn, inputs=inputs, dy=dy):
                torch.autograd.backward(fn(*inputs), dy)

            rows.append(dict(kernel=name, impl=impl, fwd=_time_ms(fwd, args.repeats),
                             bwd=_time_ms(fwd_bwd, args.repeats), mem=_peak_mib(fwd_bwd)))  # fmt: skip
            del inputs, out, dy
    return rows


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{torch.cuda.get_device_name()} · {args.dtype} · tokens {args.tokens}, hidden {args.hidden}, ffn {args.ffn}, "
        f"LoRA r {args.rank}, GaLore r {args.galore_rank} (param {args.hidden}×{args.ffn} fp32) · median of {args.repeats}",
        "",
        "| kernel | impl | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['impl']} | {r['fwd']:.3f} | {r['bwd']:.3f} | {r['mem']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    impls = ["triton", "eager", "compile"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.27
    for i, impl in enumerate(impls):
        vals = [next(r["bwd"] if r["bwd"] == r["bwd"] else r["fwd"] for r in rows if r["kernel"] == k and r["impl"] == impl)
                for k in kernels]  # fmt: skip
        ax.bar([j + i * width for j in range(len(kernels))], vals, width, label=impl)
    ax.set_xticks([j + width for j in range(len(kernels))], kernels, rotation=20, ha="right")
    ax.set_ylabel("fwd+bwd ms (optimizer: step ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--galore-rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU found: the Triton kernels are GPU kernels (CPU users get the torch references), "
              "so there is nothing to time here. GPU numbers not yet measured.")  # fmt: skip
        return 0
    rows = run(args)
    table = to_markdown(rows, args)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/kernel_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.write_text(f"# leantune Triton kernels\n\nCommand: `{command.strip()}`\n\n{table}\n\n![kernels](kernels.png)\n")
    plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
