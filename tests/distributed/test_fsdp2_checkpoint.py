"""FSDP2 checkpoints of leantune's optimizers through ``torch.distributed.checkpoint`` (what accelerate calls).

Training is saved after step 3 of 6 by 2 processes (float64, projector refreshes every 2 steps, so one falls after
the resume point) — sharded (DCP: each rank writes its rows) and full (``full_state_dict``: rank 0 writes it whole) —
and resumed:

* by 2 processes: bit for bit the uninterrupted 2-process run;
* what the state dict holds as plain tensors (written once: steps, right-side P, left-side moments, DCT indices) is
  bitwise equal on both ranks at save (SHA-256 of each);
* by 1 and by 4 processes: the uninterrupted 1-process run to 1e-10 (2 and 4 processes equal 1 to rounding),
  also for a model whose 6-row k/v projections leave one of 4 ranks without rows (``@uneven``);
* loading runs DSD's zero-gradient init step on the fresh optimizer shape-only: no projector refresh (nothing sent in
  the "refresh" phase), the global RNG untouched (spec §6.6; ``tests/optim/test_state_init.py`` checks the shapes);
* 8-bit GaLore (float32, bitsandbytes blocks): bit for bit on the same process count; on another count it follows
  (its blocks of 256 numbers fall elsewhere, so even uninterrupted runs differ by 8-bit rounding).

``make test`` runs GaLore through DCP; Fira, DCT-AdamW, DCT-Fira, rSVD GaLore and 8-bit GaLore, and the full state
dict, run in ``make test-slow`` (about a minute each).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.helpers import batches, dcp_load, dcp_save, gathered, spawn, tiny_llama

EXACT = ["galore_adamw", "fira_adamw", "dct_adamw", "dct_fira_adamw", "rsvd_galore_adamw"]
EIGHT_BIT = "galore_adamw8bit"
STEPS, SAVE_AT, GAP, RANK = 6, 3, 2, 4


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _setup(name: str, world: int | None):
    import leantune
    from leantune.optim import OptimizerConfig, build_optimizer

    name, _, variant = name.partition("@")
    # "@uneven": k_proj / v_proj of 6 rows (one key-value head of 6), split 3 + 3 by 2 processes and 2 + 2 + 2 + 0
    # by 4 (FSDP2 chunks rows by ⌈m/N⌉): one rank holds none of their rows (spec §6.1)
    uneven = {"num_key_value_heads": 1, "head_dim": 6} if variant == "uneven" else {}
    model = tiny_llama(torch.float32 if name == EIGHT_BIT else torch.float64, **uneven)
    if world is not None:
        leantune.shard_model(model)
    kwargs = {"min_8bit_size": 16} if name == EIGHT_BIT else {}
    opt = build_optimizer(model, OptimizerConfig(name, lr=1e-2, rank=RANK, update_proj_gap=GAP,
                                                 optimizer_kwargs=kwargs))
    return model, opt


def _steps(model, opt, rank: int | None, world: int, first: int, last: int) -> None:
    """Steps ``first`` … ``last - 1`` on global batches of 4 (rank ``rank`` of ``world`` takes its 4/world rows)."""
    per = 4 // world
    for ids in batches(STEPS)[first:last]:
        ids = ids if rank is None else ids[rank * per:(rank + 1) * per]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _save_run(rank: int, out: str, names: list[str]) -> dict:
    """2 processes: train to SAVE_AT, save sharded and full checkpoints, train on (the uninterrupted run)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    finals, replicated = {}, {}
    for name in names:
        model, opt = _setup(name, 2)
        _steps(model, opt, rank, 2, 0, SAVE_AT)
        replicated[name] = _digests(opt.state_dict())
        dcp_save(model, opt, str(Path(out) / f"dcp-{name}"))
        full = StateDictOptions(full_state_dict=True)
        state = {"model": get_model_state_dict(model, options=full),
                 "optim": get_optimizer_state_dict(model, opt, options=full)}
        if rank == 0:
            torch.save(state, Path(out) / f"full-{name}.pt")
        _steps(model, opt, rank, 2, SAVE_AT, STEPS)
        finals[name] = gathered(model.state_dict())
    return {"finals": finals, "replicated": replicated}


def _digests(state_dict: dict) -> dict:
    """SHA-256 of every state tensor a checkpoint writes once (not a DTensor: the same on every rank, so DCP keeps
    one rank's copy): they must be bitwise equal across ranks."""
    import hashlib

    from leantune._utils import is_sharded

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()).hexdigest()

    return {f"{pid}/{key}": digest(value) for pid, state in state_dict["state"].items() for key, value in state.items()
            if isinstance(value, torch.Tensor) and not is_sharded(value) and value.numel()}


def _resume_run(rank: int, out: str, world: int, kind: str, names: list[str]) -> dict:
    """``world`` processes: load the step-3 checkpoint (``kind``: "dcp" or "full") and train to the end."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from leantune.optim.sharded import communication_log

    finals = {}
    for name in names:
        model, opt = _setup(name, world)
        communication_log().reset()
        rng = torch.get_rng_state()
        if kind == "dcp":
            dcp_load(model, opt, str(Path(out) / f"dcp-{name}"))
        else:
            state = torch.load(Path(out) / f"full-{name}.pt", weights_only=True)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=options)
            set_optimizer_state_dict(model, opt, state["optim"], options=options)
        # DSD's zero-gradient init step of the fresh optimizer (spec §6.6): shape-only, no refresh's all-gather of the
        # gradients, the global RNG untouched (``leantune/optim/state_init.py``)
        assert communication_log().bytes.get("refresh", 0) == 0, f"{name}: the init step refreshed projectors"
        assert torch.equal(torch.get_rng_state(), rng), f"{name}: loading drew from the global RNG"
        _steps(model, opt, rank, world, SAVE_AT, STEPS)
        finals[name] = gathered(model.state_dict())
    return finals


def _single(names: list[str]) -> dict:
    finals = {}
    for name in names:
        model, opt = _setup(name, None)
        _steps(model, opt, None, 1, 0, STEPS)
        finals[name] = gathered(model.state_dict())
    return finals


def _compare(got: dict, want: dict, exact: bool, label: str) -> None:
    for name in [n for n in want if n != EIGHT_BIT]:
        for key, value in want[name].items():
            if exact:
                assert torch.equal(got[name][key], value), f"{label} {name} {key}"
            else:
                torch.testing.assert_close(got[name][key], value, rtol=0, atol=1e-10,
                                           msg=lambda m, k=key, n=name: f"{label} {n} {k}: {m}")


#: in ``make test``: GaLore through DCP; the other optimizers (8-bit GaLore too) and the full state dict: test-slow
FAST = ["galore_adamw", "galore_adamw@uneven"]


@pytest.mark.parametrize(("kind", "group"), [("dcp", "fast"), pytest.param("dcp", "rest", marks=pytest.mark.slow),
                                             pytest.param("full", "all", marks=pytest.mark.slow)])
def test_fsdp2_checkpoint_resumes_on_2_1_and_4_processes(tmp_path, kind, group):
    eight_bit = [EIGHT_BIT] if _has_bnb() and group != "fast" else []
    names = {"fast": FAST, "rest": [n for n in EXACT if n not in FAST], "all": EXACT}[group] + eight_bit
    runs = spawn(_save_run, tmp_path, str(tmp_path), names)
    for name in names:  # what is written once is the same on every rank (spec: checked by hash)
        assert runs[0]["replicated"][name] == runs[1]["replicated"][name], name
        assert runs[0]["replicated"][name], name  # (there is something to check: steps, left moments, ...)
    saved = [r["finals"] for r in runs]
    single = _single(names)
    _compare(saved[0], single, exact=False, label="uninterrupted 2 vs 1")
    for world in (2, 1, 4):
        resumed = spawn(_resume_run, tmp_path, str(tmp_path), world, kind, names, world=world)
        for r in resumed:
            _compare(r, saved[0] if world == 2 else single, exact=world == 2, label=f"{kind} resumed by {world}")
            if eight_bit:
                for key, value in saved[0][EIGHT_BIT].items():
                    if world == 2:
                        assert torch.equal(r[EIGHT_BIT][key], value), f"8-bit {kind} resumed by 2: {key}"
                    else:
                        torch.testing.assert_close(r[EIGHT_BIT][key], value, rtol=1e-3, atol=1e-3)


def _stack(rank: int, out: str, phase: str) -> dict:
    """bf16 LoRA-XS + leantune.memory + leantune.kernels + GaLore over the adapter's factors, FSDP2 on 2 ranks:
    ``phase`` "save": train to SAVE_AT, save (DCP), train on; "resume": load and train the same steps."""
    from peft import get_peft_model, get_peft_model_state_dict

    import leantune
    from leantune.kernels import apply as apply_kernels
    from leantune.memory import MemoryConfig
    from leantune.memory import apply as apply_memory
    from leantune.optim import OptimizerConfig, build_optimizer

    model = tiny_llama(torch.bfloat16)
    model = get_peft_model(model, leantune.LoraXSConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                        task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    apply_memory(model, MemoryConfig())
    apply_kernels(model, enable=True)
    leantune.shard_model(model)
    opt = build_optimizer(model, OptimizerConfig("galore_adamw", lr=1e-2, rank=2, update_proj_gap=GAP))
    path = str(Path(out) / "dcp-stack")
    if phase == "save":
        _steps(model, opt, rank, 2, 0, SAVE_AT)
        dcp_save(model, opt, path)
    else:
        dcp_load(model, opt, path)
    _steps(model, opt, rank, 2, SAVE_AT, STEPS)
    return gathered(get_peft_model_state_dict(model))


@pytest.mark.slow  # two spawns of the whole stack in bf16: about 30 s
def test_bf16_adapter_memory_kernels_galore_stack_resumes_bit_for_bit_under_fsdp2(tmp_path):
    """The combination users run, in bf16: a DCP checkpoint of the adapter + memory + kernels + GaLore stack under
    FSDP2 continues bit for bit on the same process count (bf16 states included: nothing is rounded on the way)."""
    saved = spawn(_stack, tmp_path, str(tmp_path), "save")
    resumed = spawn(_stack, tmp_path, str(tmp_path), "resume")
    for key, value in saved[0].items():
        assert value.dtype == torch.bfloat16, key
        for r in resumed:
            assert torch.equal(r[key], value), key
