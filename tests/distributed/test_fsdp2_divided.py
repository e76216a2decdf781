"""FSDP2 with ``shard_replicated=True``: the state that is otherwise whole on every rank is divided too.

* float64, 2 processes (GaLore, DCT-AdamW) and 4 (``make test-slow``, rSVD GaLore too) equal one process (to 1e-9
  relative) through three projector refreshes, and equal the undivided run on as many processes;
* per-rank state within 10% of (1-process state)/N (undivided it is not: the test shows both), and
  ``leantune plan --processes N --fsdp`` predicts both layouts within 5%;
* communication of a step without refresh, exactly (besides one byte per matrix for the all-ranks finiteness
  decision): per left matrix a reduce-scatter and an all-gather of its r×n numbers, per right matrix with a stored
  basis an all-gather of P (r×n), ring volumes (sharded.py) — and nothing else (torch's CommDebugMode sees no more
  collectives than leantune logged);
* checkpoints (DCP, ``make test-slow``) saved divided by 2 processes resume bit for bit on 2, and to 1e-10 of one
  process on 1 (undivided) and 4 (divided); an undivided checkpoint loads into a divided optimizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.helpers import batches, dcp_load, dcp_save, gathered, spawn, tiny_llama

DIVIDED = ["galore_adamw", "dct_adamw", "rsvd_galore_adamw"]
STEPS, GAP, RANK = 8, 3, 4
LAYERS = 2
#: per layer: right-side (q, k, v, o: 32×32; gate, up: 64×32) and left-side (down: 32×64) projected matrices
RIGHT_N, LEFT_N = [32] * 4 + [32] * 2, [64]


def _setup(name: str, world: int | None, divided: bool, dtype=torch.float64):
    import leantune
    from leantune.optim import OptimizerConfig, build_optimizer

    model = tiny_llama(dtype)
    if world is not None:
        leantune.shard_model(model)
    kwargs = {"shard_replicated": True} if divided else {}
    return model, build_optimizer(model, OptimizerConfig(name, lr=1e-2, rank=RANK, update_proj_gap=GAP,
                                                         optimizer_kwargs=kwargs))


def _steps(model, opt, rank: int | None, world: int, first: int, last: int, log: list | None = None) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    from leantune.optim.sharded import communication_log

    per = 4 // world
    for ids in batches(STEPS)[first:last]:
        ids = ids if rank is None else ids[rank * per:(rank + 1) * per]
        model(input_ids=ids, labels=ids).loss.backward()
        communication_log().reset()
        with CommDebugMode() as mode:
            opt.step()
        if log is not None:
            log.append({"bytes": dict(communication_log().bytes), "calls": sum(communication_log().calls.values()),
                        "torch_calls": mode.get_total_counts()})
        opt.zero_grad(set_to_none=True)


def _train(rank: int | None, world: int, divided: bool, names: list[str]) -> dict:
    """float64 training (weights, communication, state), and the state after one float32 step (for the plan)."""
    from leantune.optim.state_bytes import optimizer_state_bytes

    out = {}
    for name in names:
        model, opt = _setup(name, None if rank is None else world, divided)
        log: list = []
        _steps(model, opt, rank, world, 0, STEPS, log)
        out[name] = {"weights": gathered(model.state_dict()), "log": log, "state": _own_state(opt)}
        model, opt = _setup(name, None if rank is None else world, divided, torch.float32)
        _steps(model, opt, rank, world, 0, 1)
        out[name]["state32"] = optimizer_state_bytes(opt)
    return out


def _own_state(opt) -> int:
    """Bytes of ``optimizer.state`` this rank holds — without the DCT basis, a cache of cosines shared by all
    matrices of a size and recomputable from it (``optimizer_state_bytes`` counts it: the plan check uses that)."""
    from leantune._utils import local, storage_bytes
    from leantune.optim.state_bytes import _tensors

    return storage_bytes([local(t) for t in _tensors(dict(opt.state))])


def _planned(name: str, world: int, divided: bool) -> int:
    """``leantune plan --processes N --fsdp`` for the tiny Llama: the optimizer state per rank."""
    from leantune.plan import plan

    config = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False)
    spec = f"{name}:rank={RANK},update_proj_gap={GAP}" + (",shard_replicated=true" if divided else "")
    return plan(config, seq=8, batch=4 // world, dtype="fp32", optimizer=spec, processes=world, fsdp=world > 1,
                device="cpu").optimizer_state


def _close(got: dict, want: dict, label: str) -> None:
    for key, ref in want.items():
        torch.testing.assert_close(got[key], ref, rtol=0, atol=1e-9 * float(ref.abs().max()),
                                   msg=lambda m, key=key: f"{label} {key}: {m}")


def _check(world: int, tmp_path, names: list[str]) -> None:
    divided = spawn(_train, tmp_path, world, True, names, world=world)
    whole = spawn(_train, tmp_path, world, False, names, world=world)
    single = _train(None, 1, False, names)
    for name in names:
        for r in divided:
            _close(r[name]["weights"], single[name]["weights"], f"{name} divided ({world}) vs 1 process")
            _close(r[name]["weights"], whole[0][name]["weights"], f"{name} divided vs undivided ({world})")
        one = single[name]["state"] / world
        assert max(r[name]["state"] for r in divided) <= 1.10 * one, (name, [r[name]["state"] for r in divided], one)
        assert max(r[name]["state"] for r in whole) > max(r[name]["state"] for r in divided)  # what it is for
        for runs, flag in ((divided, True), (whole, False)):  # the plan predicts both layouts (within 5%)
            predicted = _planned(name, world, flag)
            for r in runs:
                assert abs(predicted - r[name]["state32"]) <= 0.05 * r[name]["state32"], \
                    (name, flag, predicted, r[name]["state32"])
        # a step without refresh (1, 2; 4, 5; 7): ring volumes of the reduce-scatter + all-gather of each left R
        # (r×n float64) and, for stored bases, the all-gather of each right P (r×n)
        ring = (world - 1) / world
        left = LAYERS * sum(2 * ring * RANK * n * 8 for n in LEFT_N)
        right = LAYERS * sum(ring * RANK * n * 8 for n in RIGHT_N) if name != "dct_adamw" else 0
        for r in divided:
            for step in (1, 2, 4, 5, 7):
                entry = r[name]["log"][step]
                assert entry["bytes"]["step"] == left + right, (name, step, entry)
                assert "refresh" not in entry["bytes"]
                # the finiteness decision of a projection spread over the ranks: one byte each
                assert entry["bytes"]["guard"] <= sum(1 for _ in r[name]["weights"]), entry
                assert entry["torch_calls"] <= entry["calls"], entry


def test_divided_state_under_fsdp2_equals_one_process_2_ranks(tmp_path):
    _check(2, tmp_path, ["galore_adamw", "dct_adamw"])  # a stored basis and a computed one (rSVD: 4 ranks, slow)


@pytest.mark.slow  # 4 gloo processes, three optimizers, divided and not: about a minute on 2 cores
def test_divided_state_under_fsdp2_equals_one_process_4_ranks(tmp_path):
    _check(4, tmp_path, DIVIDED)


def _save(rank: int, out: str, divided: bool, names: list[str]) -> dict:
    finals = {}
    for name in names:
        model, opt = _setup(name, 2, divided)
        _steps(model, opt, rank, 2, 0, 4)
        dcp_save(model, opt, str(Path(out) / f"dcp-{name}-{divided}"))
        _steps(model, opt, rank, 2, 4, STEPS)
        finals[name] = gathered(model.state_dict())
    return finals


def _resume(rank: int, out: str, world: int, saved_divided: bool, divided: bool, names: list[str]) -> dict:
    finals = {}
    for name in names:
        model, opt = _setup(name, world, divided)
        dcp_load(model, opt, str(Path(out) / f"dcp-{name}-{saved_divided}"))
        _steps(model, opt, rank, world, 4, STEPS)
        finals[name] = gathered(model.state_dict())
    return finals


@pytest.mark.slow  # 11 spawns of 1-4 processes: about 25 s for GaLore, a minute for the other two
@pytest.mark.parametrize("names", [["galore_adamw"], ["dct_adamw", "rsvd_galore_adamw"]])
def test_divided_state_checkpoint_resumes_on_2_1_and_4_processes(tmp_path, names):
    """Saved after step 4 of 8 (a refresh at step 6 follows): the right-side P chunks and left-side moment columns
    are DTensors of the whole (r, n), so DCP reshards them (``make test-slow``)."""
    saved = spawn(_save, tmp_path, str(tmp_path), True, names)
    spawn(_save, tmp_path, str(tmp_path), False, names)
    single = _train(None, 1, False, names)
    for world, divided, saved_divided in ((2, True, True), (1, False, True), (4, True, True), (2, True, False)):
        for r in spawn(_resume, tmp_path, str(tmp_path), world, saved_divided, divided, names, world=world):
            for name in names:
                label = f"{name}: saved {'divided' if saved_divided else 'whole'}, resumed by {world}"
                if (world, saved_divided) == (2, True):
                    for key, value in saved[0][name].items():
                        assert torch.equal(r[name][key], value), f"{label} {key}"
                else:
                    _close(r[name], single[name]["weights"], label)
