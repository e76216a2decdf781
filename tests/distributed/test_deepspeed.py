"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo: DeepSpeed picks its CPU accelerator without a GPU).

* leantune adapters + leantune.memory (+ leantune.kernels) train under ``deepspeed.initialize`` with torch's AdamW
  as client optimizer and equal one process on the whole batch (float32: ZeRO keeps fp32 master slices and
  averages the gradients, so to float32 rounding), and resume from ``save_checkpoint`` bit for bit;
* leantune's low-rank optimizers refuse to step on what ZeRO hands them (one flat 1-D slice per group instead of
  the matrices they were built with), naming FSDP2 / DDP — they would otherwise run as plain Adam.

ZeRO-2 with LoRA-XS runs in ``make test``; ZeRO-3 and ALLoRA in ``make test-slow`` (about 15 s each).

``deepspeed.initialize`` is called directly: through ``Trainer`` on CPU both ranks report ``world_size=1`` (accelerate
does not see a DeepSpeed launch without an accelerator), so the ranks would train the same batches. DeepSpeed is
installed by ``make test`` without its compiled ops (``DS_BUILD_OPS=0``); the tests skip where it is missing.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from tests.distributed.helpers import batches, gathered, spawn, tiny_llama

STEPS = 3
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _initialize(rank: int, model, opt, config: dict):
    """``deepspeed.initialize`` on the gloo group the test helper started (DeepSpeed reads the launcher's rank
    variables, which ``mp.spawn`` does not set)."""
    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce for inference (a compiler, /dev/shm segments
    # and, its comments say, AVX2/AVX-512 or a hang): machine-dependent and unused by training, so not built here
    # (``deepspeed.comm.torch`` as an attribute is the torch package deepspeed.comm imports: take the module itself)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _config(stage: int) -> dict:
    return {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _model(method: str, stage: int):
    from peft import get_peft_model

    import leantune
    from leantune.kernels import apply as apply_kernels
    from leantune.memory import MemoryConfig
    from leantune.memory import apply as apply_memory

    model = tiny_llama(torch.float32)
    for name, p in model.named_parameters():  # norm affines away from 1, so folding them is not a no-op
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    adapter = {"lora_xs": leantune.LoraXSConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
               "allora": leantune.ALLoRAConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM")}[method]
    model = get_peft_model(model, adapter)
    # ZeRO-3's module hooks hand the next layer other tensors than the norm returned, so a folded norm affine
    # (ms_norms) cannot find its input: refused at the first forward, naming MemoryConfig(ms_norms=False)
    apply_memory(model, MemoryConfig(ms_norms=stage != 3))
    apply_kernels(model, enable=True)
    return model


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _engine(rank: int, stage: int, method: str):
    torch.manual_seed(0)
    model = _model(method, stage)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return _initialize(rank, model, opt, _config(stage))


def _run(engine, rank: int, first: int, last: int) -> None:
    for ids in batches(STEPS)[first:last]:
        ids = ids[rank * 2:(rank + 1) * 2]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def _trained(engine, stage: int) -> dict:
    import deepspeed

    if stage != 3:
        return gathered(_trainable(engine.module))
    params = [p for p in engine.module.parameters() if p.requires_grad]  # partitioned: gathered whole
    with deepspeed.zero.GatheredParameters(params):
        return _trainable(engine.module)


def _train(rank: int | None, stage: int, method: str, out: str | None = None) -> dict:
    """One process (rank None) with torch's AdamW, or this rank under ZeRO: trained to the end, and (ZeRO) saved
    with ``save_checkpoint`` one step before it, loaded into a fresh engine that takes the last step."""
    if rank is None:
        torch.manual_seed(0)
        model = _model(method, stage)
        start = _trainable(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for ids in batches(STEPS):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"trained": _trainable(model), "start": start}
    engine = _engine(rank, stage, method)
    _run(engine, rank, 0, STEPS - 1)
    engine.save_checkpoint(out, tag="resume")
    _run(engine, rank, STEPS - 1, STEPS)
    trained = _trained(engine, stage)
    resumed = _engine(rank, stage, method)
    resumed.load_checkpoint(out, tag="resume")
    _run(resumed, rank, STEPS - 1, STEPS)
    return {"trained": trained, "resumed": _trained(resumed, stage),
            "low_rank": _low_rank(rank, stage)}  # the refusal, in the same processes


@pytest.mark.parametrize(("stage", "method"), [(2, "lora_xs"), *[pytest.param(*case, marks=pytest.mark.slow) for case in
                                                                 ((3, "lora_xs"), (2, "allora"), (3, "allora"))]])
def test_adapter_and_memory_under_zero_equal_one_process(tmp_path, stage, method):
    pytest.importorskip("deepspeed")
    ranks = spawn(_train, tmp_path, stage, method, str(tmp_path / "ds"))
    single = _train(None, stage, method)
    moved = 0
    for key, ref in single["trained"].items():
        for r in ranks:
            # float32: ZeRO sums the two halves' gradients in another order; Adam's m/√v carries that rounding
            # into each step, most where v is small: within 1e-3 of one step (lr 1e-2), measured ≤ 1.7e-6
            torch.testing.assert_close(r["trained"][key], ref, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=key: f"ZeRO-{stage} {k}: {m}")
        moved += not torch.equal(ref, single["start"][key])
    assert moved == len(single["trained"]) > 0  # every trainable tensor trained
    for r in ranks:
        for key, value in r["trained"].items():  # save_checkpoint / load_checkpoint: the last step bit for bit
            assert torch.equal(r["resumed"][key], value), f"ZeRO-{stage} resumed {key}"
    for r in ranks:  # GaLore on ZeRO's flat slices: refused at its first step
        assert "DeepSpeed" in r["low_rank"] and "FSDP2" in r["low_rank"], r["low_rank"]


def _low_rank(rank: int, stage: int) -> str:
    """GaLore as ZeRO's client optimizer: the message of the error its first step raises ("stepped": none)."""
    from leantune.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    model = tiny_llama(torch.float32)
    opt = build_optimizer(model, OptimizerConfig("galore_adamw", lr=1e-2, rank=4))
    engine = _initialize(rank, model, opt, {**_config(stage), "zero_allow_untested_optimizer": True})
    ids = batches(1)[0][rank * 2:(rank + 1) * 2]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    try:
        engine.step()
    except ValueError as err:
        return str(err)
    return "stepped"
