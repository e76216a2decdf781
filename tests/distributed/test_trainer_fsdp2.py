"""Trainer checkpoints under FSDP2 with leantune's row-local optimizers (gloo, CPU processes launched as torchrun
would, the accelerator state set as ``accelerate launch`` with an FSDP2 config sets it on GPUs — see
``test_trainer_ddp._run_fsdp2_trainer``).

Full-parameter training of a float64 Llama, 4 steps, checkpoint at step 2 (accelerate's ``save_fsdp_optimizer`` →
``get_optimizer_state_dict``, sharded through DCP), then ``resume_from_checkpoint``:

* by the same 2 processes: the uninterrupted run's weights bit for bit, for every row-local optimizer (projector
  refreshes every 2 steps: one falls after the resume point; 8-bit GaLore's blocks in float32);
* by 1 and by 4 processes (the same global batch): the uninterrupted run's weights to 1e-10.
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed.helpers import batches, gathered, leave, tiny_llama
from tests.distributed.test_trainer_ddp import _free_port

NAMES = ["galore_adamw", "fira_adamw", "dct_adamw", "dct_fira_adamw", "rsvd_galore_adamw", "galore_adamw8bit",
         "galore_adamw@divided", "galore_adamw@divided-bf16"]  # shard_replicated=True, in float64 and in bf16


def _worker(rank: int, world: int, port: int, out: str, names: list[str], resume: bool, state_dict_type: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(float(os.environ.get("LEANTUNE_TEST_HANG_S", 300)), exit=True)  # never hang CI
    try:
        finals = {name: _job(rank, world, out, name, resume, state_dict_type) for name in names}
        torch.save(finals, Path(out) / f"{'resumed' if resume else 'whole'}-{world}-{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    leave()


def _job(rank: int, world: int, out: str, name: str, resume: bool, state_dict_type: str) -> dict:
    import datasets
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer, TrainingArguments

    import leantune
    from leantune.optim import OptimizerConfig

    name, _, variant = name.partition("@")
    eight_bit = name == "galore_adamw8bit"
    dtype = torch.float32 if eight_bit else torch.bfloat16 if variant.endswith("bf16") else torch.float64
    ids = torch.cat(batches(6, batch=8)).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    run = Path(out) / (name + variant) / (f"resumed-{world}" if resume else "whole")
    args = TrainingArguments(output_dir=str(run), max_steps=4, per_device_train_batch_size=4 // world,
                             learning_rate=1e-2, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=1,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, ddp_backend="gloo",
                             seed=0, data_seed=0, disable_tqdm=True)
    kwargs = {"min_8bit_size": 16} if eight_bit else {"shard_replicated": True} if variant.startswith("divided") else {}
    callback = leantune.LeanTuneCallback(verbose=False, optimizer=OptimizerConfig(
        name, rank=4, update_proj_gap=2, optimizer_kwargs=kwargs))
    trainer = Trainer(model=tiny_llama(dtype), args=args, train_dataset=train)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            state_dict_type=state_dict_type,
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])

    def as_on_gpus() -> None:
        trainer.accelerator.state.distributed_type = DistributedType.FSDP
        trainer.accelerator.state.fsdp_plugin = plugin
        trainer.is_fsdp_enabled = True

    as_on_gpus()
    trainer.add_callback(_Reassert(as_on_gpus))
    for method in ("_load_from_checkpoint", "_load_optimizer_and_scheduler"):  # no callback event precedes these
        setattr(trainer, method, _after(as_on_gpus, getattr(trainer, method)))
    callback.setup(trainer)
    checkpoint = Path(out) / (name + variant) / "whole" / "checkpoint-2"
    trainer.train(resume_from_checkpoint=str(checkpoint) if resume else None)
    assert any(hasattr(p, "placements") for p in trainer.model.parameters())
    if variant.startswith("divided"):  # the r × n state really is divided over the ranks
        from leantune.optim.sharded_state import divided_keys

        opt = trainer.optimizer.optimizer
        assert any(divided_keys(p, g, opt.state[p]) for g in opt.param_groups for p in g["params"] if p in opt.state)
    return gathered(trainer.model.state_dict())


def _after(first, fn):
    def run(*args, **kwargs):
        first()
        return fn(*args, **kwargs)
    return run


class _Reassert:
    """``train()`` resets the process type that the CPU launch set; put the FSDP one back before anything saves or
    loads (a TrainerCallback by duck typing: only the events used)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *a, **k: self.fn()
        raise AttributeError(name)


def _spawn(world: int, out: Path, names: list[str], resume: bool, state_dict_type: str) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(out), names, resume, state_dict_type), nprocs=world, join=True)
    return [torch.load(out / f"{'resumed' if resume else 'whole'}-{world}-{r}.pt") for r in range(world)]


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_trainer_fsdp2_resume_is_exact(tmp_path, state_dict_type):
    """Every row-local optimizer: saved and resumed by 2 processes through Trainer, bit for bit — with accelerate's
    sharded (DCP) checkpoints and with its full state dict (rank 0 writes it; loading broadcasts it from rank 0:
    leantune hands torch contiguous tensors, which torch 2.13's broadcast needs — an fp32 right-side P is
    column-major — and puts loaded values back in the layout the state had). ``@divided``: GaLore with
    ``shard_replicated=True`` (its r × n state divided over the ranks), in float64 and bf16."""
    names = NAMES
    whole = _spawn(2, tmp_path, names, False, state_dict_type)
    resumed = _spawn(2, tmp_path, names, True, state_dict_type)
    for name in names:
        for rank in range(2):
            for key, value in whole[0][name].items():
                assert torch.equal(resumed[rank][name][key], value), (name, rank, key)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_trainer_fsdp2_resumes_on_another_process_count(tmp_path, world):
    """Saved by 2 processes (sharded, DCP), resumed by 1 or 4: the uninterrupted 2-process run to 1e-10 (float64)."""
    # 8-bit blocks fall elsewhere on another count; bf16 does not equal another count's sums
    names = [n for n in NAMES if n != "galore_adamw8bit" and not n.endswith("bf16")]
    whole = _spawn(2, tmp_path, names, False, "SHARDED_STATE_DICT")
    resumed = _spawn(world, tmp_path, names, True, "SHARDED_STATE_DICT")
    for name in names:
        for r in resumed:
            for key, value in whole[0][name].items():
                torch.testing.assert_close(r[name][key], value, rtol=0, atol=1e-10,
                                           msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
