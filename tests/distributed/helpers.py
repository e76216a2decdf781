"""Two-process gloo runs on the CPU: spawn workers, and the tiny models and batches both sides use."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _entry(rank: int, fn: Callable, init_file: str, out: str, args: tuple, world: int = WORLD) -> None:
    from tests.machine import emulate_from_env

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    emulate_from_env()  # the thread count and SVD signs .ci/run asks for (tests/machine.py)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()
    leave()


def leave() -> None:
    """End a worker that succeeded (its results are on disk) without the interpreter's teardown. There, C++ threads
    torch and its rendezvous store keep (rank 0 hosts the TCP store) could be destroyed still joinable: "terminate
    called without an active exception", a SIGABRT of a process whose work was done — seen about once per CI run
    under load, in a different test each time."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable, tmp_path: Path, *args: Any, world: int = WORLD) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` (default 2) gloo processes; returns each rank's return value (saved with
    torch.save)."""
    init_file = tmp_path / f"init{world}"
    init_file.unlink(missing_ok=True)
    mp.spawn(_entry, args=(fn, str(init_file), str(tmp_path), args, world), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                   tie_word_embeddings=False), **overrides})
    return LlamaForCausalLM(config).to(dtype)


def batches(steps: int, batch: int = 4, seq: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """``steps`` global batches of token ids (every sequence full length, so a mean over the batch equals the mean
    of the two halves' means)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, seq), generator=gen) for _ in range(steps)]


def shard(ids: torch.Tensor, rank: int) -> torch.Tensor:
    half = ids.shape[0] // WORLD
    return ids[rank * half: (rank + 1) * half]


def train_steps(runner: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int | None, steps: int) -> None:
    """``steps`` optimizer steps of a causal LM on :func:`batches` (rank None: the whole batch; else this rank's
    half)."""
    for ids in batches(steps):
        ids = ids if rank is None else shard(ids, rank)
        runner(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of a state dict's tensors, FSDP2 shards gathered whole."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def dcp_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Model and optimizer through ``torch.distributed.checkpoint`` (what accelerate's FSDP2 checkpointing calls):
    each rank writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=path)


def dcp_load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """The inverse of :func:`dcp_save`, on any process count (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
