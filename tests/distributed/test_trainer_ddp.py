"""Trainer + LeanTuneCallback under DDP (2 gloo processes launched as torchrun would: RANK/WORLD_SIZE/MASTER_* set,
the Trainer initializes the process group): per-layer GaLore stepped from DDP's all-reduce equals the plain GaLore
step bit for bit, with gradient accumulation (accelerate's no_sync micro-steps), on both ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.distributed.helpers import WORLD, batches, tiny_llama


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_trainer(rank: int, port: int, out: str, layerwise: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import datasets
    from transformers import Trainer, TrainingArguments

    import leantune
    from leantune.optim import OptimizerConfig

    model = tiny_llama(torch.float32)
    ids = torch.cat(batches(6, batch=8)).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(Path(out) / f"t{rank}"), max_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=0.0,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             ddp_backend="gloo", seed=0, data_seed=0, disable_tqdm=True)
    callback = leantune.LeanTuneCallback(optimizer=OptimizerConfig("galore_adamw", rank=4, update_proj_gap=2,
                                                                   layerwise=layerwise), verbose=False)
    trainer = callback.setup(Trainer(model=model, args=args, train_dataset=train))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert optimizer.layerwise == layerwise and (optimizer._ddp is trainer.model_wrapped) == layerwise
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               Path(out) / f"{'layerwise' if layerwise else 'plain'}{rank}.pt")


def test_trainer_layerwise_galore_under_ddp_equals_plain(tmp_path):
    for layerwise in (False, True):
        mp.spawn(_run_trainer, args=(_free_port(), str(tmp_path), layerwise), nprocs=WORLD, join=True)
    plain = torch.load(tmp_path / "plain0.pt")
    initial = tiny_llama(torch.float32).state_dict()
    assert any(not torch.equal(plain[k], initial[k]) for k in plain)  # it trained
    for rank in range(WORLD):
        for name in ("plain", "layerwise"):
            other = torch.load(tmp_path / f"{name}{rank}.pt")
            for key, value in plain.items():
                assert torch.equal(other[key], value), (name, rank, key)
