"""Trainer + LeanTuneCallback under DDP (2 gloo processes launched as torchrun would: RANK/WORLD_SIZE/MASTER_* set,
the Trainer initializes the process group): every adapter equals one process, resumes exactly and saves whole; per-layer GaLore stepped from DDP's all-reduce equals the plain GaLore
step bit for bit, with gradient accumulation (accelerate's no_sync micro-steps), on both ranks — for full-parameter
training in fp32 and for a bf16 model with a LoRA-XS adapter and leantune.memory (GaLore over the adapter)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed.helpers import WORLD, batches, gathered, leave, tiny_llama


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun(rank: int, port: int) -> None:
    """The environment torchrun gives a worker (the Trainer initializes the process group from it), one thread."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _worker(rank: int, fn, port: int, *args) -> None:
    """``fn(rank, port, *args)`` as a torchrun worker; afterwards both ranks leave the process group together (a gloo
    group still alive at interpreter exit can abort the process: "terminate called without an active exception")."""
    fn(rank, port, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    leave()


def _run_trainer(rank: int, port: int, out: str, layerwise: bool, stack: str) -> None:
    _as_torchrun(rank, port)
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
        mp.spawn(_worker, args=(_run_trainer, _free_port(), str(tmp_path), layerwise, stack), nprocs=WORLD, join=True)
    plain = torch.load(tmp_path / "plain0.pt")  # each worker also asserted that its trainable weights moved
    for rank in range(WORLD):
        for name in ("plain", "layerwise"):
            other = torch.load(tmp_path / f"{name}{rank}.pt")
            for key, value in plain.items():
                assert torch.equal(other[key], value), (name, rank, key)


def _run_lisa(rank: int, port: int, out: str) -> None:
    """LISA (1 of 2 layers active, switched every 2 steps) through the callback under DDP: every rank samples the
    same layers (seeded by the switch index, not the global RNG) and frees the same optimizer states."""
    _as_torchrun(rank, port)
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
    mp.spawn(_worker, args=(_run_lisa, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"lisa{r}.pt") for r in range(WORLD))
    assert r0["active"] == r1["active"] and r0["stateful"] == r1["stateful"]
    layers = {n.split("layers.")[1].split(".")[0] for n in r0["stateful"] if "layers." in n}
    assert layers == {str(i) for i in r0["active"]}  # states of the inactive layer were freed
    for key, value in r0["weights"].items():
        assert torch.equal(r1["weights"][key], value), key


def _run_resume(rank: int, port: int, out: str, layerwise: bool) -> None:
    """4 steps with a checkpoint at step 2, then a fresh Trainer resumed from it: the same weights, bit for bit."""
    _as_torchrun(rank, port)
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
    mp.spawn(_worker, args=(_run_resume, _free_port(), str(tmp_path), layerwise), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        whole, resumed = torch.load(tmp_path / f"resume{rank}.pt")
        for key, value in whole.items():
            assert torch.equal(resumed[key], value), (rank, key)


def _run_fsdp2_trainer(rank: int, port: int, out: str, mode: str) -> None:
    """LoRA-XS + GaLore over its factors through Trainer + LeanTuneCallback in float64, under DDP or FSDP2.

    accelerate switches its FSDP plugin on only for accelerator devices, so on this CPU the FSDP2 run sets the
    accelerator state the way ``accelerate launch`` with an FSDP2 config sets it on GPUs; the rest — accelerate's
    ``fully_shard`` of every LlamaDecoderLayer and the root, the optimizer built on DTensors, clipping, saving —
    is accelerate's and leantune's own code."""
    _as_torchrun(rank, port)
    import datasets
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from peft import get_peft_model_state_dict
    from transformers import Trainer, TrainingArguments

    import leantune
    from leantune.optim import OptimizerConfig

    ids = torch.cat(batches(6, batch=8)).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(Path(out) / mode), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, max_grad_norm=1.0, lr_scheduler_type="constant", save_strategy="no",
                             report_to=[], use_cpu=True, ddp_backend="gloo", seed=0, data_seed=0, disable_tqdm=True)
    adapter = leantune.LoraXSConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    callback = leantune.LeanTuneCallback(adapter=adapter, verbose=False,
                                         optimizer=OptimizerConfig("galore_adamw", rank=2, update_proj_gap=2))
    trainer = Trainer(model=tiny_llama(torch.float64), args=args, train_dataset=train)
    plugin = FullyShardedDataParallelPlugin(  # what TrainingArguments(fsdp_config=...) builds on a GPU machine
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"])

    def as_on_gpus():  # (train() resets the process-type field from the CPU launch; set it again before saving)
        trainer.accelerator.state.distributed_type = DistributedType.FSDP
        trainer.accelerator.state.fsdp_plugin = plugin
        trainer.is_fsdp_enabled = True

    if mode == "fsdp2":
        as_on_gpus()
    callback.setup(trainer)
    trainer.train()
    sharded = any(hasattr(p, "placements") for p in trainer.model.parameters())
    if mode == "fsdp2":
        as_on_gpus()
    trainer.save_model(str(Path(out) / f"{mode}_adapter"))
    torch.save({"adapter": gathered(get_peft_model_state_dict(trainer.model)), "sharded": sharded},
               Path(out) / f"{mode}{rank}.pt")


@pytest.mark.slow  # make test time (~39 s); Trainer under FSDP2 stays in make test through the resume tests
def test_trainer_fsdp2_equals_ddp(tmp_path):
    """The same Trainer job under FSDP2 and under DDP (float64): the same adapter on every rank, to rounding, and
    the folder Trainer saves under FSDP2 holds the whole adapter."""
    from peft import PeftModel, get_peft_model_state_dict

    import leantune  # noqa: F401 - registers leantune's tuner types with peft for loading

    for mode in ("ddp", "fsdp2"):
        mp.spawn(_worker, args=(_run_fsdp2_trainer, _free_port(), str(tmp_path), mode), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp0.pt")
    assert not ddp["sharded"]
    for rank in range(WORLD):
        fsdp = torch.load(tmp_path / f"fsdp2{rank}.pt")
        assert fsdp["sharded"]
        for key, value in ddp["adapter"].items():
            torch.testing.assert_close(fsdp["adapter"][key], value, rtol=0, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
    loaded = PeftModel.from_pretrained(tiny_llama(torch.float64), tmp_path / "fsdp2_adapter")
    for key, value in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(value, ddp["adapter"][key], rtol=0, atol=1e-12)


def _adapter_jobs(rank: int | None, port: int, out: str, names: list[str]) -> None:
    """Every adapter through Trainer + LeanTuneCallback (float64, 4 steps, checkpoint at step 2): rank None is one
    process on batches of 4, else this rank of a DDP run on batches of 2. Each job runs twice, the second time resumed
    from checkpoint-2; the final model is saved with ``trainer.save_model``."""
    if rank is not None:
        _as_torchrun(rank, port)
    import datasets
    from peft import get_peft_model_state_dict
    from transformers import Trainer, TrainingArguments

    import leantune
    from tests.distributed.test_ddp import _adapter_configs

    ids = torch.cat(batches(6, batch=8)).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    mode = "single" if rank is None else f"ddp{rank}"
    results = {}
    for name in names:
        key = name.split()[0]
        finals = []
        for resume in (False, True):
            run = Path(out) / mode[:3] / key  # one output folder per job: rank 0 writes the checkpoints
            args = TrainingArguments(output_dir=str(run), max_steps=4, per_device_train_batch_size=4 if rank is None
                                     else 4 // WORLD, learning_rate=1e-2, lr_scheduler_type="constant",
                                     save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                                     ddp_backend=None if rank is None else "gloo", seed=0, data_seed=0,
                                     disable_tqdm=True, max_grad_norm=1.0)
            callback = leantune.LeanTuneCallback(adapter=_adapter_configs()[name], verbose=False)
            trainer = callback.setup(Trainer(model=tiny_llama(torch.float64), args=args, train_dataset=train))
            trainer.train(resume_from_checkpoint=str(run / "checkpoint-2") if resume else None)
            finals.append(gathered(get_peft_model_state_dict(trainer.model)))
        trainer.save_model(str(Path(out) / f"saved-{mode[:3]}" / key))  # rank 0 writes it
        results[key] = {"adapter": finals[0], "resumed_equal": all(torch.equal(finals[0][k], finals[1][k])
                                                                  for k in finals[0])}
    torch.save(results, Path(out) / f"adapters-{mode}.pt")


def test_every_adapter_through_trainer_under_ddp(tmp_path):
    """Each leantune adapter and peft LoRA, injected by the callback before DDP wraps the model: 2 processes × batch
    2 give the adapter of 1 process × batch 4 (float64, clipping on), resuming from a checkpoint gives the same
    adapter bit for bit, and the folder Trainer saves from rank 0 loads into the whole adapter."""
    from peft import PeftModel, get_peft_model_state_dict

    from tests.distributed.test_ddp import _adapter_configs

    names = list(_adapter_configs())
    mp.spawn(_worker, args=(_adapter_jobs, _free_port(), str(tmp_path), names), nprocs=WORLD, join=True)
    _adapter_jobs(None, 0, str(tmp_path), names)
    single = torch.load(tmp_path / "adapters-single.pt")
    ranks = [torch.load(tmp_path / f"adapters-ddp{r}.pt") for r in range(WORLD)]
    for name in names:
        key = name.split()[0]
        assert single[key]["resumed_equal"], f"{name}: one process, resumed run differs"
        ref = single[key]["adapter"]
        for r in ranks:
            assert r[key]["resumed_equal"], f"{name}: DDP resumed run differs"
            for k, value in ref.items():
                assert torch.equal(r[key]["adapter"][k], ranks[0][key]["adapter"][k]), (name, k)
                torch.testing.assert_close(r[key]["adapter"][k], value, rtol=0, atol=1e-12,
                                           msg=lambda m, k=k, name=name: f"{name} {k}: {m}")
        loaded = PeftModel.from_pretrained(tiny_llama(torch.float64), tmp_path / "saved-ddp" / key)
        for k, value in get_peft_model_state_dict(loaded).items():
            torch.testing.assert_close(value, ref[k], rtol=0, atol=1e-12, msg=lambda m, k=k: f"{name} {k}: {m}")
