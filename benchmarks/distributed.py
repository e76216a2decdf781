"""Low-rank optimizers across processes: per-rank optimizer state, peak memory, step time and what the optimizer
communicates, for 1, 2 and 4 CPU processes (gloo) under DDP and FSDP2.

Model: Llama d=512, 4 layers, ffn 1376, 8 heads, vocab 256, seq 128, float32; global batch 4 (split over the
processes). Every decoder linear is projected at rank 128 (T = 200, so the timed steps do not refresh). Per rank:

* state KiB: the storages of ``optimizer.state`` on this rank (under FSDP2 the rows it holds; tensors shared by all
  layers and the same on every rank, such as the DCT basis, are not in it);
* peak MiB: ``leantune.memory.peak_bytes`` over one training step (forward, backward, optimizer step), parameters,
  gradients and state included;
* step ms: median of the timed steps (2 warm-up steps excluded; the 2 CPU cores of this machine are shared by all
  processes, so times grow with the process count: compare optimizers within a row group, not across groups);
* optimizer comm: what this rank sends in collectives inside ``optimizer.step()`` per step, as ring volumes (an
  all-reduce of S bytes: 2(N−1)/N·S; an all-gather or reduce-scatter: (N−1)/N·S; leantune's count,
  ``leantune.optim.sharded.communication_log``); "divided": ``shard_replicated=True`` (the r × n state divided
  over the ranks too); refresh: what a projector refresh gathers (every T steps);
* DDP / FSDP2 comm: the same ring volumes of what FSDP2 (parameter all-gathers in forward and backward, gradient
  reduce-scatter) sends during forward and backward, counted at ``dist.all_gather_single`` /
  ``reduce_scatter_single``; for DDP (whose reducer all-reduces in C++) the all-reduce of all gradients,
  2(N−1)/N·S.

    python benchmarks/distributed.py [--processes 1 2 4] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

OPTIMIZERS = {"AdamW (torch)": "adamw", "GaLore": "galore_adamw", "GaLore, divided": "galore_adamw+divided",
              "Fira": "fira_adamw", "DCT-AdamW": "dct_adamw", "DCT-AdamW, divided": "dct_adamw+divided",
              "8-bit GaLore": "galore_adamw8bit"}
D, LAYERS, FFN, HEADS, VOCAB, SEQ, GLOBAL_BATCH, RANK = 512, 4, 1376, 8, 256, 128, 4, 128


def _model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                        max_position_embeddings=SEQ, tie_word_embeddings=False))


def _optimizer(model, name: str):
    from leantune.optim import OptimizerConfig, build_optimizer

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    name, _, divided = name.partition("+")
    kwargs = {"shard_replicated": True} if divided else {}
    return build_optimizer(model, OptimizerConfig(name, lr=1e-3, rank=RANK, update_proj_gap=200,
                                                  optimizer_kwargs=kwargs))


class _Collectives:
    """Ring volumes (bytes one rank sends) of the all-gathers and reduce-scatters FSDP2 issues while active
    (``dist.all_gather_single`` / ``dist.reduce_scatter_single``, which FSDP2 calls) and of Python all-reduces."""

    def __init__(self) -> None:
        self.bytes, self.active, self._saved = 0, False, {}

    def __enter__(self) -> "_Collectives":
        world = dist.get_world_size()
        # (function, the tensor whose size S counts: position and keyword, ring factor)
        for fname, index, key, factor in (("all_gather_single", 0, "output_tensor", 1),
                                          ("reduce_scatter_single", 1, "input", 1), ("all_reduce", 0, "tensor", 2)):
            original = getattr(dist, fname)
            self._saved[fname] = original

            def counted(*args, _original=original, _index=index, _key=key, _factor=factor, **kwargs):
                if self.active:
                    t = args[_index] if len(args) > _index else kwargs[_key]
                    self.bytes += _factor * (world - 1) * t.numel() * t.element_size() // world
                return _original(*args, **kwargs)

            setattr(dist, fname, counted)
        return self

    def __exit__(self, *exc) -> None:
        for fname, original in self._saved.items():
            setattr(dist, fname, original)


def _state_tensors(opt) -> list[torch.Tensor]:
    """The tensors of ``opt.state`` as this rank holds them (the benchmark's "state" column and peak baseline)."""
    from leantune._utils import local
    from leantune.optim.state_bytes import _tensors

    return [local(t) for t in _tensors(dict(opt.state))]


def _worker(rank: int, world: int, port: int, mode: str, name: str, steps: int, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from leantune._utils import local, storage_bytes
        from leantune.memory.peak import peak_bytes
        from leantune.optim.sharded import communication_log

        model = _model()
        if mode == "ddp":
            runner = torch.nn.parallel.DistributedDataParallel(model)
        elif mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            runner = fully_shard(model)
        else:
            runner = model
        opt = _optimizer(model, name)
        gen = torch.Generator().manual_seed(1)
        per_rank = GLOBAL_BATCH // world
        times, comm, peak, refresh, own = [], [], 0, 0, []
        collectives = _Collectives().__enter__() if world > 1 else _Collectives()
        for step in range(steps + 2):
            ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)[rank * per_rank:(rank + 1) * per_rank]

            def one_step():
                collectives.active = True  # forward + backward: FSDP2's / DDP's own traffic
                runner(input_ids=ids, labels=ids).loss.backward()
                collectives.active = False
                communication_log().reset()
                opt.step()
                opt.zero_grad(set_to_none=True)

            start = time.perf_counter()
            if step == 2:  # measured once, steady state (the counter slows the step down: not timed)
                peak = peak_bytes(one_step, baseline=[local(p) for p in model.parameters()] + _state_tensors(opt))
                continue
            collectives.bytes = 0
            one_step()
            elapsed = time.perf_counter() - start
            if step == 0:
                refresh = communication_log().bytes.get("refresh", 0)
            elif step >= 3:
                times.append(elapsed)
                comm.append(sum(v for k, v in communication_log().bytes.items() if k != "refresh"))
                own.append(collectives.bytes)
        collectives.__exit__()
        if mode == "ddp":  # DDP's reducer all-reduces its buckets in C++, out of the counter's sight: its formula
            grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            own = [2 * (world - 1) * grads // world]
        result = {"state": storage_bytes(_state_tensors(opt)), "peak": peak, "step_s": times, "comm": comm,
                  "refresh": refresh, "own": own}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, mode: str, name: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), mode, name, steps, tmp), nprocs=world, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    return {"state": max(r["state"] for r in ranks), "peak": max(r["peak"] for r in ranks),
            "step_s": statistics.median([t for r in ranks for t in r["step_s"]]),
            "comm": max(max(r["comm"]) for r in ranks), "refresh": max(r["refresh"] for r in ranks),
            "own": max(max(r["own"], default=0) for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="optimizer labels (default: all)")
    args = ap.parse_args()
    from tqdm.auto import tqdm

    jobs = [(world, mode, label) for world in args.processes for mode in (["single"] if world == 1 else
                                                                          ["ddp", "fsdp2"])
            for label in OPTIMIZERS if (not args.only or label in args.only) and
            ("divided" not in label or mode == "fsdp2")]  # shard_replicated needs FSDP2-sharded parameters
    rows = []
    for world, mode, label in tqdm(jobs, desc="distributed"):
        rows.append({"processes": world, "mode": mode, "optimizer": label,
                     **run(world, mode, OPTIMIZERS[label], args.steps)})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Llama d={D}, {LAYERS} layers, seq {SEQ}, global batch {GLOBAL_BATCH}, fp32, rank {RANK}; gloo on a "
             f"2-core CPU; `python benchmarks/distributed.py --processes {' '.join(map(str, args.processes))} "
             f"--steps {args.steps}`", "",
             "| processes | mode | optimizer | state / rank KiB | peak / rank MiB | step ms | optimizer comm / step "
             "KiB | DDP / FSDP2 comm / step KiB | refresh gathers KiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['mode']} | {r['optimizer']} | {r['state'] / 1024:,.0f} | "
                     f"{r['peak'] / 2**20:,.1f} | {r['step_s'] * 1e3:,.0f} | {r['comm'] / 1024:,.1f} | "
                     f"{r['own'] / 1024:,.0f} | {r['refresh'] / 1024:,.0f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "distributed.md").write_text("# Distributed\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
