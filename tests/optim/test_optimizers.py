"""Resume equality, layer-wise hooks, accumulation, clipping, failure handling for every optimizer."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from leantune.optim import (
    APOLLOAdamW,
    APOLLOMini,
    CondaAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GradNormLoRPAdamW,
    GradNormLoRPAdamW8bit,
    NaturalGaLoreAdamW,
    OptimizerConfig,
    make_param_groups,
)
from tests.optim.helpers import batches, loss_fn, make_net, params_equal, train

TARGETS = ["up", "mid", "down"]

# name -> (class, group options, optimizer kwargs)
OPTIMIZERS = {
    "galore_adamw": (GaLoreAdamW, {}, {"lr": 3e-3}),
    "galore_adamw_reference": (GaLoreAdamW, {}, {"lr": 3e-3, "reference_adam": True, "weight_decay": 0.1}),
    "galore_adamw8bit": (GaLoreAdamW8bit, {}, {"lr": 3e-3, "min_8bit_size": 64, "weight_decay": 0.1}),
    "galore_adafactor": (GaLoreAdafactor, {}, {"lr": 3e-3, "beta1": 0.9}),
    "fira_adamw": (FiraAdamW, {}, {"lr": 3e-3}),
    "natural_galore_adamw": (NaturalGaLoreAdamW, {}, {"lr": 3e-3, "history_size": 3}),
    "dct_adamw": (GaLoreAdamW, {"projector": "dct", "scale": 1.0}, {"lr": 3e-3}),
    "rsvd_galore_rotate": (GaLoreAdamW, {"projector": "rsvd", "moment_policy": "rotate"}, {"lr": 3e-3}),
    "galore_reset": (GaLoreAdamW, {"moment_policy": "reset"}, {"lr": 3e-3}),
    "apollo_adamw": (APOLLOAdamW, {"projector": "random", "scale": 1.0}, {"lr": 3e-3}),
    "apollo_mini": (APOLLOMini, {"projector": "random", "scale": 128.0, "rank": 1}, {"lr": 3e-3}),
    "conda_adamw": (CondaAdamW, {"rank": None}, {"lr": 3e-3}),
    "gradnorm_lorp": (GradNormLoRPAdamW, {}, {"lr": 3e-3}),
    "gradnorm_lorp_two_sided": (GradNormLoRPAdamW, {"projector": "svd2"}, {"lr": 3e-3}),
    "gradnorm_lorp8bit": (GradNormLoRPAdamW8bit, {}, {"lr": 3e-3, "min_8bit_size": 64}),
}


def build(name: str, model, layerwise: bool = False, accumulation_steps: int = 1, **extra):
    cls, group_opts, kwargs = OPTIMIZERS[name]
    groups = make_param_groups(model, target_modules=TARGETS, **{"rank": 4, "update_proj_gap": 3, "scale": 0.25,
                                                                 **group_opts}, **extra)
    return cls(groups, layerwise=layerwise, accumulation_steps=accumulation_steps, **kwargs)


def scheduler_for(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_equals_uninterrupted(name, layerwise):
    data = batches(10)
    ref_model = make_net()
    ref_opt = build(name, ref_model, layerwise)
    train(ref_model, ref_opt, data, scheduler_for(ref_opt))

    model = make_net()
    opt = build(name, model, layerwise)
    sched = scheduler_for(opt)
    train(model, opt, data[:4], sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # only tensors and plain values, projectors included
    projection_keys = ("proj_", "conda_basis")  # a projector's state (Conda: its basis)
    assert any(k.startswith(projection_keys) for st in ckpt["opt"]["state"].values() for k in st)

    resumed = make_net(seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build(name, resumed, layerwise)
    sched2 = scheduler_for(opt2)  # same order as Trainer: build both, then load both
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train(resumed, opt2, data[4:], sched2)
    assert params_equal(ref_model, resumed)
    assert not params_equal(ref_model, make_net())


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw", "galore_adamw8bit", "natural_galore_adamw", "dct_adamw"])
def test_layerwise_hook_equals_step(name):
    data = batches(7)
    a, b = make_net(), make_net()
    oa, ob = build(name, a), build(name, b, layerwise=True)
    train(a, oa, data, scheduler_for(oa))
    train(b, ob, data, scheduler_for(ob))
    assert params_equal(a, b)
    assert all(p.grad is None for p in b.parameters())  # gradients freed inside backward
    assert not params_equal(b, make_net())


def test_layerwise_frees_gradients_during_backward():
    model = make_net()
    opt = build("galore_adamw", model, layerwise=True)
    seen = []
    model.up.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append(model.down.weight.grad is None))  # down's hook fired earlier in backward
    loss_fn(model, batches(1)[0]).backward()
    assert seen == [True]
    assert opt.state[model.down.weight]["step"] == 1


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw"])
def test_accumulation_steps_at_boundary_and_flushes_partial_window(name):
    data = batches(5)  # 2 full windows of 2, then a partial window flushed by step()
    a, b = make_net(), make_net()
    oa, ob = build(name, a), build(name, b, layerwise=True, accumulation_steps=2)
    train(a, oa, data, accumulation=2)
    train(b, ob, data, accumulation=2)
    assert ob.state[b.mid.weight]["step"] == 2
    assert b.mid.weight.grad is not None  # the 5th micro-batch is pending, as in the step path
    oa.step()
    ob.step()
    assert params_equal(a, b)
    assert ob.state[b.mid.weight]["step"] == 3 and b.mid.weight.grad is None


def test_per_parameter_clipping_same_in_both_paths_and_effective():
    data = batches(4)
    a, b, c = make_net(), make_net(), make_net()
    oa = build("galore_adamw", a, max_grad_norm_per_param=1e-3)
    ob = build("galore_adamw", b, layerwise=True, max_grad_norm_per_param=1e-3)
    oc = build("galore_adamw", c)
    for m, o in ((a, oa), (b, ob), (c, oc)):
        train(m, o, data)
    assert params_equal(a, b)
    assert not params_equal(a, c)


def test_layerwise_under_ddp_needs_attach_and_no_accumulation_steps(monkeypatch):
    """Under DDP the accumulate-grad hooks are not used (they would see local gradients): step() without
    attach_ddp raises, and accumulation_steps > 1 is refused (no_sync does that job). tests/distributed runs it."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    opt = build("galore_adamw", make_net(), layerwise=True)
    with pytest.raises(RuntimeError, match="attach_ddp"):
        opt.step()
    with pytest.raises(ValueError, match="no_sync"):
        build("galore_adamw", make_net(), layerwise=True, accumulation_steps=2)
    build("galore_adamw", make_net(), layerwise=False)  # plain mode is fine under DDP


def test_failed_svd_keeps_projector_and_nan_grad_never_reaches_weights(monkeypatch):
    model = make_net()
    opt = build("galore_adamw", model)
    data = batches(4)
    train(model, opt, data[:3])  # steps 0..2, refresh at 0
    before = opt.state[model.mid.weight]["proj_ortho"].clone()

    def broken_svd(*args, **kwargs):
        raise RuntimeError("linalg.svd: failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    with pytest.warns(RuntimeWarning, match="keeping the previous projector"):
        train(model, opt, data[3:])  # step 3 is a refresh step
    assert torch.equal(opt.state[model.mid.weight]["proj_ortho"], before)
    assert opt.state[model.mid.weight]["step"] == 4  # the update still happened with the old projector
    monkeypatch.undo()

    w = model.mid.weight.detach().clone()
    for _ in range(2):  # steps 4, 5 (no refresh) then step 6 (refresh) with a NaN gradient
        train(model, opt, batches(1, seed=5))
    loss_fn(model, batches(1)[0]).backward()
    model.mid.weight.grad.fill_(float("nan"))
    w = model.mid.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(model.mid.weight, w)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rotate_policy_rotates_moments_into_new_basis():
    model = make_net()
    opt = build("rsvd_galore_rotate", model)
    train(model, opt, batches(3))
    st = opt.state[model.mid.weight]
    P_old, m_old = st["proj_ortho"].clone(), st["exp_avg"].clone()
    loss_fn(model, batches(1, seed=7)[0]).backward()
    g = model.mid.weight.grad.clone()
    opt.step()  # step 3 refreshes
    P_new = st["proj_ortho"]
    right = st["proj_right"]
    T = P_old @ P_new.t() if right else P_new.t() @ P_old
    rotated = m_old @ T if right else T @ m_old
    R = g @ P_new.t() if right else P_new.t() @ g
    torch.testing.assert_close(st["exp_avg"], 0.9 * rotated + 0.1 * R, rtol=1e-5, atol=1e-7)


def test_eight_bit_states_are_uint8_and_track_fp32():
    a, b = make_net(), make_net()
    oa = build("galore_adamw8bit", a)
    cls, group_opts, _ = OPTIMIZERS["galore_adamw"]
    ob = GaLoreAdamW(make_param_groups(b, target_modules=TARGETS, rank=4, update_proj_gap=3, scale=0.25),
                     lr=3e-3, weight_decay=0.1)
    train(a, oa, batches(6))
    train(b, ob, batches(6))
    st = oa.state[a.mid.weight]
    assert st["state1"].dtype == torch.uint8 and st["state1"].shape == (40, 4)
    assert "exp_avg" not in st
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=2e-3)
    assert not params_equal(a, make_net())


@pytest.mark.parametrize("reference_order", [True, False], ids=["reference-order", "one-GEMM"])
@pytest.mark.parametrize("scale_parameter", [False, True], ids=["lr", "lr·RMS(W)"])
@pytest.mark.parametrize("scale", [0.25, 0.3, 1.0], ids=["power-of-two", "other", "one"])
def test_adafactor_matches_galore_torch(scale, scale_parameter, reference_order):
    """With ``reference_order=True`` bit for bit, also where leantune takes the cheaper route (α folded into the
    low-rank factor for α = 2^k, RMS(W) computed only when η_t uses it); by default (the update as one GEMM into W,
    decay as its beta) equal up to float32 rounding, given LAPACK's signs as galore-torch takes them (by default a
    basis is sign-oriented: another trajectory of kept moments, by design)."""
    galore_torch = pytest.importorskip("galore_torch")
    a, b = make_net(), make_net()
    low = [a.up.weight, a.mid.weight, a.down.weight]
    rest = [p for p in a.parameters() if all(p is not q for q in low)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdafactor(
            [{"params": rest}, {"params": low, "rank": 4, "update_proj_gap": 3, "scale": scale, "proj_type": "std"}],
            lr=3e-3, relative_step=False, scale_parameter=scale_parameter, warmup_init=False, beta1=0.9,
            weight_decay=0.1)
    groups = make_param_groups(b, target_modules=TARGETS, rank=4, update_proj_gap=3, scale=scale)
    for group in groups:
        group["weight_decay"] = 0.1  # galore-torch decays every parameter (biases and norms too)
        if "rank" in group:
            group["svd_signs"] = "lapack"
    ours = GaLoreAdafactor(groups, lr=3e-3, beta1=0.9, scale_parameter=scale_parameter,
                           reference_order=reference_order)
    train(a, ref, batches(8))
    train(b, ours, batches(8))
    if reference_order:
        assert params_equal(a, b)
    else:
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    assert not params_equal(b, make_net())


def test_adam_settings_refused_for_adafactor():
    """betas / eps / reference_adam mean nothing to Adafactor: refused, naming its own options."""
    for bad in ({"betas": (0.9, 0.99)}, {"eps": 1e-8}, {"reference_adam": True}):
        with pytest.raises(ValueError, match=r"are Adam settings; 'galore_adafactor' is not Adam-based.*reference_order"):
            OptimizerConfig("galore_adafactor", **bad)


def _fira_run(projector: str, gamma: float, dtype: torch.dtype, steps: int, merged: bool, monkeypatch,
              state: dict | None = None, scale: float = 0.25):
    """A model trained ``steps`` steps by default-arithmetic Fira, merged update or S₀ formed (from ``state``)."""
    model = make_net().to(dtype)
    groups = make_param_groups(model, target_modules=TARGETS, rank=4, update_proj_gap=4, scale=scale,
                               projector=projector, weight_decay=0.1)
    opt = FiraAdamW(groups, lr=1e-2, gamma=gamma)
    opt.force_path = "merged" if merged else "gemm"  # the two twins, chosen explicitly
    data = [(x.to(dtype), y.to(dtype)) for x, y in batches(10)]
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        data = data[-steps:]
    train(model, opt, data[:steps])
    monkeypatch.undo()
    return model, opt


@pytest.mark.parametrize("scale", [0.25, 2.0, 3.0], ids=["alpha-0.25", "alpha-2", "alpha-3"])
@pytest.mark.parametrize("projector", ["svd", "rsvd", "dct"])
@pytest.mark.parametrize("gamma", [1.01, 1.0], ids=["default-limiter", "limiter-always"])
def test_fira_merged_update_equals_forming_the_residual(projector, gamma, scale, monkeypatch):
    """Fira's default update (‖S₀_c‖ from ‖G_c‖ and ‖R_c‖, the residual's low-rank part inside GaLore's GEMM, one
    pass over G) equals forming S₀ = G − α back(R) and adding it (the path it replaces): 10 fp32 steps on tall and
    wide matrices, with weight decay, projector refreshes and the growth limiter, to float32 rounding, at GaLore's
    α = 0.25, LLaMA-Factory's fine-tuning α = 2 (where 2α − α² = 0) and α = 3 (where it is negative)."""
    merged, _ = _fira_run(projector, gamma, torch.float32, 10, True, monkeypatch, scale=scale)
    formed, _ = _fira_run(projector, gamma, torch.float32, 10, False, monkeypatch, scale=scale)
    for (name, a), b, w0 in zip(merged.named_parameters(), formed.parameters(), make_net().parameters()):
        moved = float((b - w0).abs().max())
        assert moved > 0
        assert float((a - b).abs().max()) <= 1e-5 * max(moved, 1.0), name


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_fira_merged_update_in_bf16_is_within_rounding_of_forming_the_residual(projector, monkeypatch):
    """bf16 weights: from the same state (6 steps in), one step each way lands within two bf16 spacings (each path
    rounds W twice; over 10 steps the different roundings lead to different trajectories, so one step is compared)."""
    model, opt = _fira_run(projector, 1.0, torch.bfloat16, 6, True, monkeypatch)
    state = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    merged, _ = _fira_run(projector, 1.0, torch.bfloat16, 1, True, monkeypatch, state)
    formed, _ = _fira_run(projector, 1.0, torch.bfloat16, 1, False, monkeypatch, state)
    for (name, a), b, w in zip(merged.named_parameters(), formed.parameters(), model.parameters()):
        assert not torch.equal(b, w), name  # the step moved it
        # rounding happens at the scale of the operands: W and the step (whose parts may be larger than W after it)
        ulp = torch.finfo(torch.bfloat16).eps * (w.abs() + (a - w).abs() + (b - w).abs()).float()
        assert bool(((a - b).float().abs() <= 2 * ulp).all()), name  # each within a rounding of the exact step


def test_checkpoint_from_before_an_option_existed_resumes():
    """A state dict written before ``reference_order`` existed (GaLoreAdafactor's group lacks the key) loads, and
    the option takes the optimizer's value."""
    a, b = make_net(), make_net()
    opt = GaLoreAdafactor(make_param_groups(a, target_modules=TARGETS, rank=4, update_proj_gap=3), lr=3e-3)
    train(a, opt, batches(3))
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["reference_order"]
    b.load_state_dict(a.state_dict())
    resumed = GaLoreAdafactor(make_param_groups(b, target_modules=TARGETS, rank=4, update_proj_gap=3), lr=3e-3)
    resumed.load_state_dict(saved)
    assert all(group["reference_order"] is False for group in resumed.param_groups)
    train(a, opt, batches(5)[3:])
    train(b, resumed, batches(5)[3:])
    assert params_equal(a, b)


@pytest.mark.parametrize("projector", ["svd", "svd2"])
def test_gradnorm_lorp_bf16_step_is_the_fp32_step_rounded(projector):
    """bf16 weights (the fp32 copy of W, the row scale in the 16-bit projection): one step from a trained state
    lands within two bf16 spacings (of the operands' scale) of the same step taken in fp32 from that state. (Not
    DCT: its bf16 basis is itself a rounded copy of the fp32 one, a difference of the basis, not of the step.)"""
    torch.manual_seed(0)
    model = make_net().to(torch.bfloat16)
    groups = lambda m: make_param_groups(m, target_modules=TARGETS, rank=4, update_proj_gap=100,  # noqa: E731
                                         projector=projector)
    opt = GradNormLoRPAdamW(groups(model), lr=1e-2)
    data = [(x.to(torch.bfloat16), y.to(torch.bfloat16)) for x, y in batches(5)]
    train(model, opt, data[:4])
    states = copy.deepcopy(opt.state_dict())
    x, y = data[4]
    model.zero_grad()
    loss_fn(model, (x, y)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    twin = copy.deepcopy(model).float()
    twin_opt = GradNormLoRPAdamW(groups(twin), lr=1e-2)
    for st in states["state"].values():  # the same state, in fp32 (moments, projector)
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
                st[key] = value.float()
    twin_opt.load_state_dict(states)
    for p, q, g in zip(model.parameters(), twin.parameters(), grads):
        p.grad, q.grad = g, g.float()
    opt.step()
    twin_opt.step()
    for (name, a), b, w in zip(model.named_parameters(), twin.parameters(), start):
        assert not torch.equal(a, w), name
        scale = w.float().abs() + (b - w.float()).abs()
        assert bool(((a.float() - b).abs() <= 2 * torch.finfo(torch.bfloat16).eps * scale + 1e-30).all()), name


@pytest.mark.parametrize(("cls", "why"), [(GaLoreAdamW, "none of its parameters is sharded"),
                                          (FiraAdamW, "Fira's residual"),
                                          (GaLoreAdamW8bit, "8-bit blocks over divided columns")])
def test_shard_replicated_refused_where_it_cannot_divide(cls, why):
    """``shard_replicated=True`` divides FSDP2 state (tests/distributed/test_fsdp2_divided.py); for a rule that needs
    the whole projected gradient it is refused at construction, naming what to use; without FSDP2 before the first
    step changes anything (Trainer + accelerate shard the model after building the optimizer)."""
    model = make_net()
    groups = make_param_groups(model, target_modules=TARGETS, rank=4)
    if cls is not GaLoreAdamW:
        with pytest.raises(ValueError, match=why):
            cls(groups, shard_replicated=True)
        return
    opt = cls(groups, shard_replicated=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=why):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and not opt.state
