"""Full-parameter training with GaLore / Fira under FSDP2: each process holds a row shard of every weight, its
gradient and its optimizer state, and the low-rank projection runs on those rows.

    accelerate launch --config_file recipes/accelerate/fsdp2_cpu.yaml recipes/fsdp2.py        # 2 CPU processes
    torchrun --nproc_per_node 2 recipes/fsdp2.py --optimizer fira_adamw --rank 64                # the same, torchrun
    torchrun --nproc_per_node 8 recipes/fsdp2.py --model PATH/TO/causal-lm --steps 1000          # GPUs (NCCL)
    torchrun --nproc_per_node 2 recipes/fsdp2.py --save-every 10                                 # checkpoints
    torchrun --nproc_per_node 4 recipes/fsdp2.py --resume runs/fsdp2/checkpoint-10               # on 4 processes

What happens (``leantune.optim.sharded``): ``fully_shard`` per decoder layer, then the root; the optimizer is built
on the sharded parameters. A right-side matrix (m ≥ n) is projected and updated on this rank's rows with no
communication; a left-side one (m < n) all-reduces its r×n projection once per step; a projector refresh (every T
steps) gathers the whole gradient once. Optimizers that need statistics across rows (Adafactor, APOLLO, Conda, ...)
and per-layer updates are refused with what to use instead.

accelerate enables its own FSDP plugin only for accelerator devices (on a CPU it launches plain processes), so this
script applies ``fully_shard`` itself: the launcher only starts the processes and sets RANK / WORLD_SIZE / MASTER_*.
Text: Shakespeare (see ``recipes/pretrain.py``); without ``--model`` a small Llama is built from a config. Each
rank reads its own part of every global batch. Rank 0 prints the loss, the per-rank optimizer state and what the
optimizer communicated, and saves the trained model (gathered) to ``OUT/model``.

Checkpoints (``--save-every N``): ``torch.distributed.checkpoint`` folders ``OUT/checkpoint-STEP`` holding the model,
the optimizer (leantune's sharded state is DTensors: each rank writes its rows) and the step. ``--resume FOLDER``
continues from one on any number of processes (the global batch stays ``--batch``): on the same count the run
continues bit for bit, on another to the rounding of a different reduction order.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.pretrain import build_default_model, text_blocks  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local causal-LM folder (default: a small Llama from a config)")
    ap.add_argument("--optimizer", default="galore_adamw",
                    help="galore_adamw | galore_adamw8bit | fira_adamw | dct_adamw | dct_fira_adamw | adamw")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--update-proj-gap", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--out", default="runs/fsdp2")
    ap.add_argument("--save-every", type=int, default=0, help="write OUT/checkpoint-STEP every N steps (0: never)")
    ap.add_argument("--resume", help="a checkpoint folder written by --save-every: continue from its step")
    args = ap.parse_args(argv)

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import leantune
    from leantune.optim import OptimizerConfig, build_optimizer, optimizer_state_bytes
    from leantune.optim.sharded import communication_log

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(args.out)
    model_dir = Path(args.model) if args.model else out / "init"
    if not args.model and rank == 0:
        build_default_model(model_dir)
    dist.barrier()  # every rank loads the same initial weights
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if backend == "nccl":
        model.cuda()
    leantune.shard_model(model)  # fully_shard per decoder layer, then the root
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    else:
        optimizer = build_optimizer(model, OptimizerConfig(args.optimizer, lr=args.lr, rank=args.rank,
                                                           update_proj_gap=args.update_proj_gap))
    train, _ = text_blocks(tokenizer, args.block, max_blocks=args.steps * args.batch)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} processes")
    per_rank = args.batch // world
    device = next(model.parameters()).device

    def checkpoint(step: int) -> dict:
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                "step": torch.tensor(step)}

    first = 0
    if args.resume:
        if not (Path(args.resume) / ".metadata").is_file():
            raise SystemExit(f"leantune: error: --resume {args.resume}: not a checkpoint folder (no .metadata)")
        state = checkpoint(0)
        dcp.load(state, checkpoint_id=args.resume)  # into this process count's shards
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        first = int(state["step"])
    losses, comm = [], []
    start = time.perf_counter()
    for step in range(first, args.steps):
        rows = [train[(step * args.batch + rank * per_rank + i) % len(train)] for i in range(per_rank)]
        ids = torch.tensor(rows, device=device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        communication_log().reset()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        comm.append(sum(communication_log().bytes.values()))
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  optimizer comm {comm[-1] / 1024:.1f} KiB", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            dcp.save(checkpoint(step + 1), checkpoint_id=str(out / f"checkpoint-{step + 1}"))
    state = optimizer_state_bytes(optimizer) if args.optimizer != "adamw" else None
    if not losses:
        raise SystemExit(f"leantune: error: nothing to train: the checkpoint is at step {first} of --steps {args.steps}")
    summary = {"processes": world, "optimizer": args.optimizer, "first_loss": losses[0], "last_loss": losses[-1],
               "seconds": time.perf_counter() - start, "state_bytes_rank0": state}
    # gathered by torch: whole tensors, on rank 0's CPU only (every rank takes part in the gathering)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out / "model", state_dict=full)
        tokenizer.save_pretrained(out / "model")
        print(f"{world} processes, {args.optimizer}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps; "
              f"optimizer state on rank 0: {state / 2**20 if state else float('nan'):.1f} MiB; model saved to "
              f"{out / 'model'}")
    dist.barrier()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
