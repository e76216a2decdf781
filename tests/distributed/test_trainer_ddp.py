"""Trainer + LeanTuneCallback under DDP (2 gloo processes launched as torchrun would: RANK/WORLD_SIZE/MASTER_* set,
the Trainer initializes the process group): per-layer GaLore stepped from DDP's all-reduce equals the plain GaLore
step bit for bit, with gradient accumulation (accelerate's no_sync micro-steps), on both ranks — for full-parameter
training in fp32 and for a bf16 model with a LoRA-XS adapter and leantune.memory (GaLore over the adapter)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.helpers import WORLD, batches, tiny_llama


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_trainer(rank: int, port: int, out: str, layerwise: bool, stack: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import datasets
    from transformers import Trainer, TrainingArguments

    import leantune
    from leantune.optim import OptimizerConfig

    model = tiny_llama(torch.float32 if stack == "full" else torch.bfloat16)
    ids = torch.cat(batches(6, batch=8)).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(Path(out) / f"t{rank}"), max_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=0.0,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             ddp_backend="gloo", seed=0, data_seed=0, disable_tqdm=True)
    optimizer = OptimizerConfig("galore_adamw", rank=4, update_proj_gap=2, layerwise=layerwise)
    if stack == "full":
        callback = leantune.LeanTuneCallback(optimizer=optimizer, verbose=False)
    else:  # bf16 model, LoRA-XS adapter, leantune.memory, GaLore over the adapter's factors
        adapter = leantune.LoraXSConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
        callback = leantune.LeanTuneCallback(adapter=adapter, optimizer=optimizer, memory=True, verbose=False)
    trainer = callback.setup(Trainer(model=model, args=args, train_dataset=train))
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert optimizer.layerwise == layerwise and (optimizer._ddp is trainer.model_wrapped) == layerwise
    moved = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert moved, "nothing trained"
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
               Path(out) / f"{'layerwise' if layerwise else 'plain'}{rank}.pt")


@pytest.mark.parametrize("stack", ["full", "lora_xs+memory-bf16"])
def test_trainer_layerwise_galore_under_ddp_equals_plain(tmp_path, stack):
    for layerwise in (False, True):
        mp.spawn(_run_trainer, args=(_free_port(), str(tmp_path), layerwise, stack), nprocs=WORLD, join=True)
    plain = torch.load(tmp_path / "plain0.pt")  # each worker also asserted that its trainable weights moved
    for rank in range(WORLD):
        for name in ("plain", "layerwise"):
            other = torch.load(tmp_path / f"{name}{rank}.pt")
            for key, value in plain.items():
                assert torch.equal(other[key], value), (name, rank, key)


def _run_lisa(rank: int, port: int, out: str) -> None:
    """LISA (1 of 2 layers active, switched every 2 steps) through the callback under DDP: every rank samples the
    same layers (seeded by the switch index, not the global RNG) and frees the same optimizer states."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # ranks' global RNGs differ: the sampled layers must not depend on them
    import datasets
    from transformers import Trainer, TrainingArguments

    import leantune

    model = tiny_llama(torch.float32)
    ids = torch.cat(batches(6, batch=8)).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(Path(out) / f"t{rank}"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             use_cpu=True, ddp_backend="gloo", seed=0, data_seed=0, disable_tqdm=True,
                             ddp_find_unused_parameters=True)
    callback = leantune.LeanTuneCallback(lisa={"n_layers": 1, "interval_steps": 2}, verbose=False)
    trainer = callback.setup(Trainer(model=model, args=args, train_dataset=train))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lisa = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "LISACallback"][0]
    torch.save({"weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                "stateful": sorted(names[id(p)] for p in optimizer.state), "active": lisa.active},
               Path(out) / f"lisa{rank}.pt")


def test_lisa_under_ddp_samples_the_same_layers_on_every_rank(tmp_path):
    mp.spawn(_run_lisa, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"lisa{r}.pt") for r in range(WORLD))
    assert r0["active"] == r1["active"] and r0["stateful"] == r1["stateful"]
    layers = {n.split("layers.")[1].split(".")[0] for n in r0["stateful"] if "layers." in n}
    assert layers == {str(i) for i in r0["active"]}  # states of the inactive layer were freed
    for key, value in r0["weights"].items():
        assert torch.equal(r1["weights"][key], value), key


def _run_resume(rank: int, port: int, out: str, layerwise: bool) -> None:
    """4 steps with a checkpoint at step 2, then a fresh Trainer resumed from it: the same weights, bit for bit."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import datasets
    from transformers import Trainer, TrainingArguments

    import leantune
    from leantune.optim import OptimizerConfig

    ids = torch.cat(batches(6, batch=8)).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    finals = []
    for resume in (False, True):
        args = TrainingArguments(output_dir=str(Path(out) / "run"), max_steps=4, per_device_train_batch_size=2,
                                 learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps",
                                 save_steps=2, report_to=[], use_cpu=True, ddp_backend="gloo", seed=0, data_seed=0,
                                 disable_tqdm=True, max_grad_norm=0.0)
        callback = leantune.LeanTuneCallback(optimizer=OptimizerConfig("fira_adamw", rank=4, update_proj_gap=3,
                                                                       layerwise=layerwise), verbose=False)
        trainer = callback.setup(Trainer(model=tiny_llama(torch.float32), args=args, train_dataset=train))
        trainer.train(resume_from_checkpoint=str(Path(out) / "run" / "checkpoint-2") if resume else None)
        finals.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    torch.save(finals, Path(out) / f"resume{rank}.pt")


@pytest.mark.parametrize("layerwise", [False, True])
def test_resume_under_ddp_is_exact(tmp_path, layerwise):
    """Fira (refresh every 3 steps, so one falls after the resume point), plain and per-layer, under DDP: resuming
    from the step-2 checkpoint gives the uninterrupted run's weights on both ranks."""
    mp.spawn(_run_resume, args=(_free_port(), str(tmp_path), layerwise), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        whole, resumed = torch.load(tmp_path / f"resume{rank}.pt")
        for key, value in whole.items():
            assert torch.equal(resumed[key], value), (rank, key)
