"""FSDP2 (``fully_shard`` per decoder layer, gloo, 2 CPU processes): the low-rank optimizers run on each rank's rows.

* float64: 2 processes × batch b give the weights of 1 process × batch 2b (to 1e-10), projector refreshes included
  (update_proj_gap=2), for GaLore, Fira, DCT, DCT-Fira and rSVD GaLore, on right-side (q_proj, gate/up_proj) and
  left-side (down_proj) matrices; 8-bit GaLore (float32) follows the single-process loss curve;
* communication: a step without refresh communicates exactly the r×n reduction of each left projection (GaLore),
  plus channel / scalar norms for Fira — counted by leantune and checked against torch's CommDebugMode, so that no
  DTensor redistribution happens behind our back; a refresh step all-gathers the gradients once;
* state per rank: the right-side moments hold this rank's rows only;
* bf16: from the same gradients, every tensor's update is the single-process bf16 update up to rounding (a
  projection that skips the sum over shards is 60-120% off); an adapter + memory + kernels + GaLore stack trains
  in bf16 as in one process;
* resume from ``state_dict`` (DTensor rows) and from a per-rank one of earlier versions continues bit for bit
  (checkpoints through DCP and Trainer on other process counts: ``test_fsdp2_checkpoint.py``);
* what cannot run row-locally is refused at construction, naming what to use instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.helpers import batches, gathered, shard, spawn, tiny_llama, train_steps

STEPS = 5
#: the optimizer comparison: 8 steps with refreshes at 0, 3, 6 (two refreshes carry state into a new basis)
OPT_STEPS, OPT_GAP = 8, 3
ROW_LOCAL = ["galore_adamw", "fira_adamw", "dct_adamw", "dct_fira_adamw", "rsvd_galore_adamw"]
REFUSED = ["galore_adafactor", "apollo_adamw", "apollo_mini", "natural_galore_adamw", "conda_adamw", "gradnorm_lorp"]
RANK = 4


def _build(model, name, gap: int = 2, **kw):
    from leantune.optim import OPTIMIZERS, OptimizerConfig, build_optimizer

    kwargs = {"min_8bit_size": 16} if name == "galore_adamw8bit" else {}
    rank = None if OPTIMIZERS[name].fixed_rank or OPTIMIZERS[name].rank is None else RANK
    return build_optimizer(model, OptimizerConfig(name, lr=1e-2, rank=rank, update_proj_gap=gap,
                                                  optimizer_kwargs=kwargs, **kw))


def _shard_model(model):
    import leantune

    return leantune.shard_model(model)  # decoder layers, then the root (a PeftModel's tuner-level tensors too)


def _train(rank: int | None, names: list[str], dtype: torch.dtype, steps: int = STEPS, gap: int = 2,
           policy: str = "keep") -> dict:
    """rank None: one process on the whole batch; else this rank's half under FSDP2. Records, per step, what the
    optimizer communicated (leantune's log and torch's CommDebugMode)."""
    from torch.distributed.tensor.debug import CommDebugMode

    from leantune.optim.sharded import communication_log

    out = {}
    for name in names:
        model = tiny_llama(dtype)
        if rank is not None:
            torch.manual_seed(1000 + rank)  # each rank's RNG differs: nothing may depend on it
            _shard_model(model)
        opt = _build(model, name, gap, moment_policy=policy)
        losses, comm = [], []
        for ids in batches(steps):
            ids = ids if rank is None else shard(ids, rank)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            communication_log().reset()
            with CommDebugMode() as mode:
                opt.step()
            comm.append({"leantune": dict(communication_log().bytes), "calls": dict(communication_log().calls),
                         "torch_calls": mode.get_total_counts()})
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if rank is not None:
            losses = torch.stack(losses)
            torch.distributed.all_reduce(losses)
            losses = losses / 2
        moments = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if "exp_avg" in st:
                    moments[tuple(p.shape)] = tuple(st["exp_avg"].shape)
        out[name] = {"weights": gathered(model.state_dict()), "losses": torch.stack(list(losses)), "comm": comm,
                     "moments": moments}
    return out


@pytest.mark.parametrize("policy", ["keep", "reset"])  # rotate is refused under FSDP2 (test below)
def test_row_local_optimizers_under_fsdp2_equal_one_process(tmp_path, policy):
    """Every row-local optimizer under FSDP2 equals one process (float64, to 1e-9 relative) after 8 steps and two
    refreshes, both ranks holding the same gathered weights (SVD bases sign-oriented: see test_ddp). Communication:
    steps 1 and 4 (0-based; refreshes at 0, 3, 6) send, per left-projected matrix (down_proj, 32×64, r=4), its
    r×n = 256 float64 numbers, and nothing else for GaLore; every collective is leantune's own (CommDebugMode sees
    no more calls than leantune logged). Refresh steps all-gather each projected gradient once; from the second on,
    a left-side basis (its rows spread over ranks) also sums its r overlaps with the previous basis. Right-side
    moments hold this rank's rows only (m/2 × r)."""
    ranks = spawn(_train, tmp_path, ROW_LOCAL, torch.float64, OPT_STEPS, OPT_GAP, policy)
    single = _train(None, ROW_LOCAL, torch.float64, OPT_STEPS, OPT_GAP, policy)
    for name in ROW_LOCAL:
        for key, ref in single[name]["weights"].items():
            assert torch.equal(ranks[0][name]["weights"][key], ranks[1][name]["weights"][key]), (name, key)
            torch.testing.assert_close(ranks[0][name]["weights"][key], ref, rtol=0,
                                       atol=1e-9 * float(ref.abs().max()),
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")
    layers = 2
    left_bytes = layers * RANK * 64 * 8
    for r in ranks:
        galore, fira = r["galore_adamw"], r["fira_adamw"]
        for step in (1, 4):
            assert galore["comm"][step]["leantune"]["step"] == left_bytes
            assert "refresh" not in galore["comm"][step]["leantune"]
            # Fira adds per left matrix its n column norms, per right matrix one scalar (6 right matrices a layer)
            assert fira["comm"][step]["leantune"]["step"] == left_bytes + layers * (64 * 8 + 6 * 8)
            for run in (galore, fira):
                calls = sum(run["comm"][step]["calls"].values())
                assert run["comm"][step]["torch_calls"] <= calls, run["comm"][step]
        # a refresh gathers each projected matrix once: 4 of 32×32 (q,k,v,o), 3 of 64×32 (gate, up, down) a layer;
        # the left-side down_proj's basis sums its RANK overlaps with the previous one (SVD sign orientation)
        gathered_bytes = layers * (4 * 32 * 32 + 3 * 64 * 32) * 8 // 2  # ring volume: (N−1)/N of it at N = 2
        assert galore["comm"][0]["leantune"]["refresh"] == gathered_bytes
        assert galore["comm"][3]["leantune"]["refresh"] == gathered_bytes + layers * RANK * 8
        moments = galore["moments"]
        assert moments[(64, 32)] == (32, RANK)  # gate/up: right side, this rank's 32 of 64 rows
        assert moments[(32, 64)] == (RANK, 64)  # down: left side, r × n on every rank
        assert moments[(32, 32)] == (16, RANK)


@pytest.mark.slow  # 8-bit moments on row shards: the same code path as GaLore, blockwise quantized
def test_8bit_galore_under_fsdp2_follows_one_process(tmp_path):
    pytest.importorskip("bitsandbytes")
    ranks = spawn(_train, tmp_path, ["galore_adamw8bit"], torch.float32)
    single = _train(None, ["galore_adamw8bit"], torch.float32)
    torch.testing.assert_close(ranks[0]["galore_adamw8bit"]["losses"], single["galore_adamw8bit"]["losses"],
                               rtol=1e-3, atol=1e-3)
    for key in single["galore_adamw8bit"]["weights"]:
        assert torch.equal(ranks[0]["galore_adamw8bit"]["weights"][key], ranks[1]["galore_adamw8bit"]["weights"][key])


def _resume_and_refusals(rank: int) -> dict:
    out = {}
    for name in ("galore_adamw", "fira_adamw", "dct_adamw"):
        data = [shard(ids, rank) for ids in batches(STEPS)]
        runs = []
        for resume in (None, "dtensors", "per-rank"):
            model = _shard_model(tiny_llama())
            opt = _build(model, name)
            for i, ids in enumerate(data):
                if resume and i == 3:  # a fresh optimizer from this rank's checkpoint
                    # per-rank: the layout before DTensor state (plain tensors of this rank's rows) still loads
                    saved = copy.deepcopy(opt.state_dict() if resume == "dtensors" else
                                          torch.optim.Optimizer.state_dict(opt))
                    assert any(hasattr(v, "placements") for st in saved["state"].values() for v in st.values()) \
                        == (resume == "dtensors")
                    opt = _build(model, name)
                    opt.load_state_dict(saved)
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            runs.append(gathered(model.state_dict()))
        out[name] = all(torch.equal(runs[0][k], run[k]) for run in runs[1:] for k in runs[0])
    errors = {}
    model = _shard_model(tiny_llama())
    opt = _build(model, "galore_adamw")
    model(input_ids=data[0], labels=data[0]).loss.backward()
    opt.step()
    saved = opt.state_dict()  # spec §6.3: a DTensor of another global shape (another model) is refused by name
    entry = next(st for st in saved["state"].values() if "exp_avg" in st and hasattr(st["exp_avg"], "placements")
                 and st["exp_avg"].shape[0] == 64)
    from torch.distributed.tensor import DTensor

    wrong = entry["exp_avg"]
    entry["exp_avg"] = DTensor.from_local(wrong.to_local(), wrong.device_mesh, wrong.placements, run_check=False,
                                          shape=(wrong.shape[0] + 2, *wrong.shape[1:]),
                                          stride=torch.empty(wrong.shape[0] + 2, *wrong.shape[1:]).stride())
    try:
        _build(model, "galore_adamw").load_state_dict(saved)
    except ValueError as err:
        errors["global shape"] = str(err)
    for name in REFUSED:
        try:
            _build(model, name)
        except ValueError as err:
            errors[name] = str(err)
    for label, kw in (("layerwise", {"layerwise": True}), ("rotate", {"moment_policy": "rotate"})):
        try:
            _build(model, "galore_adamw", **kw)
        except ValueError as err:
            errors[label] = str(err)
    from peft import get_peft_model

    from tests.distributed.test_ddp import _adapter_configs

    compacter = get_peft_model(tiny_llama(), _adapter_configs()["compacter"])
    _shard_model(compacter.base_model.model)  # the shared rule (tuner-level) left out of every FSDP2 unit
    try:
        from leantune.optim import GaLoreAdamW

        GaLoreAdamW([p for p in compacter.parameters() if p.requires_grad])
    except ValueError as err:
        errors["unmanaged"] = str(err)
    from leantune.optim import LISACallback

    try:
        LISACallback(n_layers=1).setup(_shard_model(tiny_llama()))
    except ValueError as err:
        errors["lisa"] = str(err)
    out["errors"] = errors
    return out


def test_resume_and_refusals_under_fsdp2(tmp_path):
    ranks = spawn(_resume_and_refusals, tmp_path)
    for r in ranks:
        assert r["galore_adamw"] and r["fira_adamw"] and r["dct_adamw"], "resume from a per-rank state_dict differs"
        errors = r["errors"]
        assert sorted(errors) == sorted(REFUSED + ["layerwise", "rotate", "unmanaged", "lisa", "global shape"]), errors
        assert "DTensor of global shape (66," in errors["global shape"] and "another model" in errors["global shape"]
        assert "LISA under DDP" in errors["lisa"]
        assert "not sharded by FSDP2" in errors["unmanaged"] and "root" in errors["unmanaged"]
        for name in REFUSED:
            assert "FSDP2" in errors[name] and "galore_adamw" in errors[name] and "DDP" in errors[name], errors[name]
        assert "DDP" in errors["layerwise"] and "layerwise=False" in errors["layerwise"]
        assert "'keep'" in errors["rotate"]


def test_adapters_under_fsdp2_equal_one_process_and_save_whole(tmp_path):
    """Every leantune adapter and peft LoRA: 2 FSDP2 processes × batch b = 1 process × batch 2b (float64), and the
    folder rank 0 writes holds the whole adapter (loaded into a fresh model, it equals the single-process one)."""
    from peft import PeftModel, get_peft_model_state_dict

    from tests.distributed.test_ddp import _adapter_configs, _train_adapters

    names = list(_adapter_configs())
    ranks = spawn(_train_adapters, tmp_path, names, "fsdp2", str(tmp_path / "saved"))
    single = _train_adapters(None, names)
    for name in names:
        for key, ref in single[name].items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
            torch.testing.assert_close(ranks[0][name][key], ref, rtol=0, atol=1e-12)
        loaded = PeftModel.from_pretrained(tiny_llama(torch.float64), tmp_path / "saved" / name.split()[0])
        for key, value in get_peft_model_state_dict(loaded).items():
            torch.testing.assert_close(value, single[name][key], rtol=0, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")


def _stack(rank: int | None, mode: str, dtype: torch.dtype = torch.float64) -> dict:
    """A LoRA-XS adapter + leantune.memory (exact techniques and the 2-bit activation derivatives, all element-wise
    or per row) + leantune.kernels, patched before wrapping, trained with GaLore over the adapter's factors."""
    from peft import get_peft_model, get_peft_model_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    import leantune
    from leantune.kernels import apply as apply_kernels
    from leantune.memory import MemoryConfig
    from leantune.memory import apply as apply_memory
    from leantune.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    model = tiny_llama(dtype)
    for name, p in model.named_parameters():  # norm affines away from 1, so folding them is not a no-op
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    model = get_peft_model(model, leantune.LoraXSConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                        task_type="CAUSAL_LM"),
                           autocast_adapter_dtype=False)  # bf16: the adapter in the model's dtype (one dtype a unit)
    apply_memory(model, MemoryConfig())
    patched = apply_kernels(model, enable=True)
    start = gathered(get_peft_model_state_dict(model))
    runner = model
    if rank is not None:
        torch.manual_seed(1000 + rank)
        runner = DDP(model) if mode == "ddp" else _shard_model(model)
    train_steps(runner, build_optimizer(model, OptimizerConfig("galore_adamw", lr=1e-2, rank=2, update_proj_gap=2)),
                rank, STEPS)
    return {"adapter": gathered(get_peft_model_state_dict(model)), "start": start, "kernels": patched}


@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp2"])
def test_memory_kernels_adapter_and_galore_compose_across_processes(tmp_path, mode):
    ranks = spawn(_stack, tmp_path, mode)
    single = _stack(None, mode)
    assert sum(single["kernels"].values()) > 0, single["kernels"]
    for key, ref in single["adapter"].items():
        assert torch.equal(ranks[0]["adapter"][key], ranks[1]["adapter"][key]), key
        torch.testing.assert_close(ranks[0]["adapter"][key], ref, rtol=0, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")


def test_memory_kernels_adapter_and_galore_compose_under_fsdp2_in_bf16(tmp_path):
    """The same stack with bf16 weights: each trained tensor's update (LoRA-XS's R) within 5% of the single-process
    bf16 update (measured ≤ 2.4%: a bf16 backward sums the two halves' gradients in another order), the frozen
    factors untouched."""
    ranks = spawn(_stack, tmp_path, "fsdp2", torch.bfloat16)
    single = _stack(None, "fsdp2", torch.bfloat16)
    assert sum(single["kernels"].values()) > 0, single["kernels"]
    trained = 0
    for key, ref in single["adapter"].items():
        assert ranks[0]["adapter"][key].dtype == torch.bfloat16, key
        update = (ref.double() - single["start"][key].double()).norm()
        if update == 0:  # frozen A and B
            assert torch.equal(ranks[0]["adapter"][key], ref), key
            continue
        trained += 1
        off = ((ranks[0]["adapter"][key].double() - ref.double()).norm() / update).item()
        assert off <= 0.05, f"{key}: FSDP2 update {off:.1%} off the single-process bf16 update"
    assert trained == 6  # q, v, down_proj in 2 layers


def _mixed_dtypes(rank: int) -> dict:
    """A bf16 model with Compacter: peft upcasts the adapter to fp32 next to the bf16 LayerNorms it trains, which
    FSDP2 rejects at the first forward; shard_model refuses before sharding, and the fix it names works."""
    from peft import get_peft_model

    import leantune
    from tests.distributed.test_ddp import _adapter_configs

    out = {}
    model = get_peft_model(tiny_llama(torch.bfloat16), _adapter_configs()["compacter"])
    try:
        leantune.shard_model(model)
    except ValueError as err:
        out["error"] = str(err)
    out["sharded_after_error"] = any(hasattr(p, "placements") for p in model.parameters())
    model = get_peft_model(tiny_llama(torch.bfloat16), _adapter_configs()["compacter"], autocast_adapter_dtype=False)
    leantune.shard_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = shard(batches(1)[0], rank)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    out["trained"] = True
    return out


def test_shard_model_refuses_mixed_dtype_units_before_sharding(tmp_path):
    for r in spawn(_mixed_dtypes, tmp_path):
        assert "one dtype" in r["error"] and "autocast_adapter_dtype=False" in r["error"], r
        assert "bfloat16" in r["error"] and "float32" in r["error"]
        assert not r["sharded_after_error"] and r["trained"]


BF16_STEPS = 4


def _given_gradients(rank: int | None, names: list[str], dtype: torch.dtype) -> dict:
    """Each optimizer from the same weights, fed the same whole-model gradients (drawn from one generator and
    distributed to the row shards), so the only difference between FSDP2 and one process is the optimizer itself:
    the left projection's sum over shards, the gathered refresh, Fira's norms — not the reduction order of a backward
    pass, which in bf16 moves weights by more than a broken projection would (see the test below)."""
    from torch.distributed.tensor import distribute_tensor

    from leantune._utils import is_sharded

    out = {}
    for name in names:
        model = tiny_llama(dtype)
        if rank is not None:
            _shard_model(model)
        opt = _build(model, name)
        before = gathered(model.state_dict())
        gen = torch.Generator().manual_seed(7)
        for _ in range(BF16_STEPS):
            for p in model.parameters():
                full = _gradient(tuple(p.shape), gen).to(dtype)
                p.grad = distribute_tensor(full, p.device_mesh, p.placements) if is_sharded(p) else full
            opt.step()
            opt.zero_grad(set_to_none=True)
        after = gathered(model.state_dict())
        out[name] = {k: (after[k].double() - before[k].double()) for k in after}  # the total update of each tensor
    return out


def _gradient(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A gradient with a decaying spectrum (a rank-4 signal, entries of std ~1.2-1.6, + noise of std 0.1), as real
    ones have: its top singular subspace is well separated, so bf16 and float32 pick the same projector (a
    white-noise matrix has nearly equal singular values, and rounding alone would swap its singular vectors)."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if len(shape) == 2:
        left = torch.randn(shape[0], 4, generator=gen, dtype=torch.float64) * torch.tensor([8.0, 4.0, 2.0, 1.0])
        g = left @ torch.randn(4, shape[1], generator=gen, dtype=torch.float64) / shape[1] ** 0.5 + 0.1 * g
    return g * 1e-2


def test_row_local_optimizers_under_fsdp2_in_bf16(tmp_path):
    """bf16 weights under FSDP2, 4 steps with refreshes at 0 and 2: every tensor's total update is the single-process
    bf16 update from the same gradients up to rounding (relative norm of the difference). Measured here: matrices
    ≤ 1.4% (8-bit GaLore 3.0%, its quantization blocks follow the shard), 1-D norm weights 3.0% (7.2%: bf16
    element-wise kernels round a 16-element shard and a 32-element row differently, by one ulp of a weight near 1).
    With the left projection's sum over shards removed, down_proj is 60-120% off for every optimizer; with Fira's
    norms taken over this rank's rows only, Fira's and DCT-Fira's matrices are 17% off."""
    names = ROW_LOCAL + (["galore_adamw8bit"] if _has_bnb() else [])
    ranks = spawn(_given_gradients, tmp_path, names, torch.bfloat16)
    single = _given_gradients(None, names, torch.bfloat16)
    for name in names:
        for key, ref in single[name].items():
            assert ref.norm() > 0, (name, key)
            off = ((ranks[0][name][key] - ref).norm() / ref.norm()).item()
            limit = (0.03 if ref.dim() == 2 else 0.06) * (2 if name == "galore_adamw8bit" else 1)
            assert off <= limit, f"{name} {key}: FSDP2 update {off:.1%} off the single-process bf16 update"


def _has_bnb() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None
