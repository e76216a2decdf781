"""DDP (gloo, 2 CPU processes): every low-rank optimizer and every leantune adapter gives, with 2 processes x batch b,
the weights of 1 process x batch 2b (float64, where the two orders of summation agree to ~1e-14), identical on both
ranks bit for bit — projector refreshes included (update_proj_gap=2) and with each rank's global RNG deliberately
out of step. 8-bit optimizers (float32 only) keep ranks bitwise identical and follow the single-process loss."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.distributed.helpers import batches, gathered, shard, spawn, tiny_llama, train_steps

STEPS = 5
#: the optimizer comparison: 8 steps with refreshes at 0, 3, 6 (two refreshes carry state into a new basis)
OPT_STEPS, OPT_GAP = 8, 3
FP64_OPTIMIZERS = ["galore_adamw", "galore_adafactor", "fira_adamw", "natural_galore_adamw", "dct_adamw",
                   "dct_fira_adamw", "rsvd_galore_adamw", "apollo_adamw", "apollo_mini", "gradnorm_lorp"]
INT8_OPTIMIZERS = ["galore_adamw8bit", "gradnorm_lorp8bit"]
#: Conda's SVD runs in float32 whatever the parameter dtype (as the official code), so its float64 runs agree to
#: float32 rounding of the basis, amplified over 5 steps; every other optimizer stays at float64 rounding
#: Conda is not in FP64_OPTIMIZERS: its SVD runs in float32 whatever the parameter dtype (the official code's choice)
#: and its first moment is rank-deficient early on, so the basis of its (near-)null directions is decided by float32
#: rounding, which differs with the process count and the CPU's GEMM path (measured after 8 steps: up to 1.3% of the
#: largest weight of a q_proj under MKL_ENABLE_INSTRUCTIONS=AVX2). Its signs do not matter (test_svd_signs.py); the
#: rotation within near-degenerate singular subspaces does. Its claim: ranks identical, losses follow one process.
RTOL: dict[str, float] = {}
#: optimizers whose state lives in an SVD basis, and the moment policies each takes
SVD_POLICIES = {"galore_adamw": ("reset", "rotate"), "galore_adafactor": ("reset",), "fira_adamw": ("reset", "rotate"),
                "natural_galore_adamw": ("reset", "rotate"), "rsvd_galore_adamw": ("reset", "rotate"),
                "gradnorm_lorp": ("reset",)}


def _optimizer(model, name, policy: str = "keep", gap: int = 2):
    from leantune.optim import OPTIMIZERS, OptimizerConfig, build_optimizer

    rank = None if OPTIMIZERS[name].fixed_rank or OPTIMIZERS[name].rank is None else 4
    return build_optimizer(model, OptimizerConfig(name, lr=1e-2, rank=rank, update_proj_gap=gap,
                                                  moment_policy=policy))


def _train_optimizers(rank: int | None, names: list[str], dtype: torch.dtype, policy: str = "keep",
                      steps: int = STEPS, gap: int = 2) -> dict:
    """rank None: one process on the whole batch; else this rank's half under DDP. ``names`` with a policy the
    optimizer does not take are left out."""
    out = {}
    for name in names:
        if policy != "keep" and policy not in SVD_POLICIES.get(name, ()):
            continue
        model = tiny_llama(dtype)
        torch.manual_seed(1000 + (rank or 0))  # each rank's RNG differs: nothing may depend on it
        runner = model if rank is None else DDP(model)
        opt = _optimizer(model, name, policy, gap)
        losses = []
        for ids in batches(steps):
            ids = ids if rank is None else shard(ids, rank)
            loss = runner(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if rank is not None:  # the global mean loss, as the single process sees it
            losses = torch.stack(losses)
            torch.distributed.all_reduce(losses)
            losses = losses / 2
        out[name] = {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                     "losses": torch.stack(list(losses))}
    return out


def _adapter_configs() -> dict:
    from peft import LoraConfig

    import leantune as lt

    t = dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    return {
        "lora (peft)": LoraConfig(r=4, lora_alpha=8, **t),
        "lora_xs": lt.LoraXSConfig(r=4, **t),
        "allora": lt.ALLoRAConfig(r=4, **t),
        "dylora": lt.DyLoRAConfig(r=4, **t),
        "nola": lt.NolaConfig(r=4, num_basis_A=8, num_basis_B=8, **t),
        "compacter": lt.CompacterConfig(reduction_factor=4, task_type="CAUSAL_LM"),
        "sltrain": lt.SLTrainConfig(r=4, **t),
        "lost": lt.LostConfig(r=4, **t),
    }


def _train_adapters(rank: int | None, names: list[str], mode: str = "ddp", out_dir: str | None = None) -> dict:
    """rank None: one process on the whole batch; else this rank's half under DDP, or FSDP2 (``mode="fsdp2"``:
    ``leantune.shard_model``, the adapter injected before, then also saved with ``leantune.save_adapter`` from
    every rank into ``out_dir``). Returns the (gathered) adapter weights."""
    from peft import get_peft_model, get_peft_model_state_dict

    import leantune

    out = {}
    for name in names:
        model = get_peft_model(tiny_llama(torch.float64), _adapter_configs()[name])
        torch.manual_seed(1000 + (rank or 0))
        runner = model if rank is None else DDP(model) if mode == "ddp" else leantune.shard_model(model)
        train_steps(runner, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), rank,
                    STEPS)
        out[name] = gathered(get_peft_model_state_dict(model))
        if rank is not None and out_dir is not None:
            leantune.save_adapter(model, f"{out_dir}/{name.split()[0]}")
    return out


def _assert_same(single: dict, ranks: list[dict], atol: float | None = None, rtol: float | None = None,
                 label: str = "") -> None:
    """Ranks bitwise equal, and equal to the single process to ``atol``, or to ``rtol`` relative to the tensor's
    largest magnitude."""
    for key, ref in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{label} {key}: ranks differ"
        bound = atol if rtol is None else rtol * float(ref.abs().max())
        torch.testing.assert_close(ranks[0][key], ref, rtol=0, atol=bound, msg=lambda m, key=key: f"{label} {key}: {m}")


# make test time: "keep" in make test, the two restart policies (same machinery, ~27 s each) in make test-slow
@pytest.mark.parametrize("policy", ["keep", pytest.param("reset", marks=pytest.mark.slow),
                                    pytest.param("rotate", marks=pytest.mark.slow)])
def test_low_rank_optimizers_under_ddp_equal_one_process(tmp_path, policy):
    """2 processes = 1 process to 1e-9 (relative, float64) after 8 steps and two refreshes, for every low-rank
    optimizer and moment policy. The two sum the gradient in other orders (last-bit differences), and LAPACK may
    then return singular vectors of other signs: each new basis is sign-oriented (``leantune.optim.svd``), so kept
    and rotated moments mean the same in both. ``.ci/run`` reruns this with the SVD's signs scrambled
    (``LEANTUNE_TEST_SVD_SIGNS=scramble``), under emulated CPUs and at 1 and 2 threads. Conda: see ``RTOL``."""
    ranks = spawn(_train_optimizers, tmp_path, FP64_OPTIMIZERS, torch.float64, policy, OPT_STEPS, OPT_GAP)
    single = _train_optimizers(None, FP64_OPTIMIZERS, torch.float64, policy, OPT_STEPS, OPT_GAP)
    assert set(single) == {n for n in FP64_OPTIMIZERS if policy == "keep" or policy in SVD_POLICIES.get(n, ())}
    for name in single:
        _assert_same(single[name]["weights"], [r[name]["weights"] for r in ranks], rtol=RTOL.get(name, 1e-9),
                     label=name)


@pytest.mark.slow  # make test time (~22 s); Conda's DDP path is its full-basis variant of the row-local step
def test_conda_under_ddp_keeps_ranks_identical_and_follows_one_process(tmp_path):
    ranks = spawn(_train_optimizers, tmp_path, ["conda_adamw"], torch.float64, "keep", OPT_STEPS, OPT_GAP)
    single = _train_optimizers(None, ["conda_adamw"], torch.float64, "keep", OPT_STEPS, OPT_GAP)
    for key in single["conda_adamw"]["weights"]:
        assert torch.equal(ranks[0]["conda_adamw"]["weights"][key], ranks[1]["conda_adamw"]["weights"][key]), key
    torch.testing.assert_close(ranks[0]["conda_adamw"]["losses"], single["conda_adamw"]["losses"], rtol=1e-3, atol=0)


def test_8bit_optimizers_under_ddp_keep_ranks_identical(tmp_path):
    pytest.importorskip("bitsandbytes")
    ranks = spawn(_train_optimizers, tmp_path, INT8_OPTIMIZERS, torch.float32)
    single = _train_optimizers(None, INT8_OPTIMIZERS, torch.float32)
    for name in INT8_OPTIMIZERS:
        for key in single[name]["weights"]:
            assert torch.equal(ranks[0][name]["weights"][key], ranks[1][name]["weights"][key]), (name, key)
        torch.testing.assert_close(ranks[0][name]["losses"], single[name]["losses"], rtol=1e-3, atol=1e-4)


def test_adapters_under_ddp_equal_one_process(tmp_path):
    names = list(_adapter_configs())
    ranks = spawn(_train_adapters, tmp_path, names)
    single = _train_adapters(None, names)
    for name in names:
        _assert_same(single[name], [r[name] for r in ranks], atol=1e-12)


def _layerwise_ddp(rank: int, names: list[str], accumulate: int) -> dict:
    """Per-layer updates driven by the DDP hook vs plain DDP steps, on the same data (optionally with no_sync
    micro-steps); and what happens without attach_ddp."""
    from contextlib import nullcontext

    from leantune.optim import OptimizerConfig, build_optimizer

    out = {}
    for name in names:
        runs = {}
        for layerwise in (False, True):
            model = tiny_llama()
            ddp = DDP(model)
            rank_ = None if name == "apollo_mini" else 4
            opt = build_optimizer(model, OptimizerConfig(name, lr=1e-2, rank=rank_, update_proj_gap=2,
                                                         layerwise=layerwise))
            if layerwise:
                opt.attach_ddp(ddp)
            for ids in batches(STEPS, batch=4 * accumulate):
                micro = shard(ids, rank).chunk(accumulate)
                for i, part in enumerate(micro):
                    sync = i == len(micro) - 1
                    with nullcontext() if sync else ddp.no_sync():
                        (ddp(input_ids=part, labels=part).loss / accumulate).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            runs[layerwise] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[name] = runs
    errors = []
    opt = build_optimizer(tiny_llama(), OptimizerConfig("galore_adamw", rank=4, layerwise=True))
    try:
        opt.step()
    except RuntimeError as err:
        errors.append(str(err))
    try:
        build_optimizer(tiny_llama(), OptimizerConfig("galore_adamw", rank=4, layerwise=True, accumulation_steps=2))
    except ValueError as err:
        errors.append(str(err))
    out["errors"] = errors
    return out


@pytest.mark.parametrize("accumulate", [1, 2])
def test_layerwise_under_ddp_equals_plain_ddp(tmp_path, accumulate):
    """Per-layer updates stepped from DDP's all-reduce hook give the plain DDP step's weights bit for bit (with
    no_sync micro-steps too), identical on both ranks; without attach_ddp, step() refuses."""
    names = ["galore_adamw", "fira_adamw", "apollo_mini"] if accumulate == 1 else ["galore_adamw"]
    ranks = spawn(_layerwise_ddp, tmp_path, names, accumulate)
    for name in names:
        for key, plain in ranks[0][name][False].items():
            assert torch.equal(ranks[0][name][True][key], plain), (name, key)
            assert torch.equal(ranks[1][name][True][key], plain), (name, key)
    assert "attach_ddp" in ranks[0]["errors"][0] and "no_sync" in ranks[0]["errors"][1]


def _quzo_run(rank, steps: int = 3):
    """QuZO on full parameters, float64: each rank probes its half of every global batch; returns the μ of each
    update (after the mean over ranks) and the final weights. ``rank=None``: one process on the whole batches."""
    from leantune.optim import QuZO

    model = tiny_llama()
    torch.manual_seed(100 + (rank or 0))  # the global RNG out of step across ranks: QuZO must not use it
    opt = QuZO(model.parameters(), lr=1e-3, eps=1e-3, bits=4, seed=5, weight_bits=None)
    mus = []
    for ids in batches(steps):
        mine = ids if rank is None else shard(ids, rank)
        # the loss in float64 (transformers' causal-LM loss casts the logits to float32)
        opt.step(lambda: torch.nn.functional.cross_entropy(model(input_ids=mine).logits[:, :-1].flatten(0, 1),
                                                            mine[:, 1:].flatten()))
        mus.append(opt.last_mu)
    return mus, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_quzo_under_ddp_shares_mu_and_equals_one_process(tmp_path):
    """Spec §7.11: every rank regenerates the same perturbation from the seed, only the scalars μ are averaged (one
    all-reduce per step), so μ and the weights are identical on both ranks bit for bit, and equal one process on
    the whole batch (whose loss is the mean of the two halves' losses) to float64 rounding."""
    (mu0, w0), (mu1, w1) = spawn(_quzo_run, tmp_path)
    alone_mu, alone_w = _quzo_run(None)
    assert all(torch.equal(a, b) for a, b in zip(mu0, mu1))
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    for a, b in zip(mu0, alone_mu):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for name in w0:
        torch.testing.assert_close(w0[name], alone_w[name], rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(w0[n], tiny_llama().state_dict()[n]) for n in w0)
