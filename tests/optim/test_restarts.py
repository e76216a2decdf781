"""Momentum reset, LR recovery and weight refactorization (Glentis et al. 2025): each against its definition."""

from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from leantune.optim import GaLoreAdamW, OptimizerConfig, build_optimizer
from leantune.optim.restarts import low_rank_pairs, refactorize
from tests.optim.helpers import batches, galore_groups, loss_fn, make_net, params_equal


def test_refactorize_keeps_the_product_and_balances():
    torch.manual_seed(0)
    B, A = torch.randn(20, 4, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64) * 3
    product = B @ A
    assert refactorize(B, A)
    torch.testing.assert_close(B @ A, product, rtol=1e-12, atol=1e-12)
    sigma = torch.linalg.svdvals(product)[:4]
    torch.testing.assert_close(B.T @ B, torch.diag(sigma), rtol=1e-10, atol=1e-10)  # BᵀB = A Aᵀ = Σ_r
    torch.testing.assert_close(A @ A.T, torch.diag(sigma), rtol=1e-10, atol=1e-10)
    B2, A2 = B.clone(), A.clone()
    assert refactorize(B2, A2)  # idempotent up to signs
    torch.testing.assert_close((B2 @ A2), product, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B2.abs(), B.abs(), rtol=1e-9, atol=1e-9)


def test_refactorize_leaves_rank_deficient_pairs():
    """LoRA's B = 0 (or any B A of rank < r): balancing would zero trainable directions forever, so it is skipped."""
    B, A = torch.zeros(20, 4), torch.randn(4, 12)
    assert not refactorize(B, A)
    assert torch.equal(B, torch.zeros(20, 4))


def _lora_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 6))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    return model


def test_refactorization_keeps_the_model_function():
    model = _lora_model()
    x = torch.randn(8, 12)
    before = model(x)
    pairs = low_rank_pairs(model)
    assert [name for name, _, _ in pairs] == ["base_model.model.0.default", "base_model.model.2.default"]
    assert all(refactorize(B, A) for _, B, A in pairs)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def _run(opt, model, data):
    for xy in data:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()


def test_reset_equals_a_rebuilt_optimizer_with_recovery_ramp():
    """reset_every=3, recovery 2: steps 1-3 as usual; then a fresh optimizer (moments, step counters, projectors
    rebuilt) whose lr is 0.001x, 0.5005x, 1x at steps 4, 5, 6."""
    data = batches(6)
    model = make_net()
    opt = GaLoreAdamW(galore_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    opt.enable_restarts(3, "all", recovery_steps=2)
    _run(opt, model, data)

    ref = make_net()
    _run(GaLoreAdamW(galore_groups(ref, rank=3, update_proj_gap=2), lr=1e-2), ref, data[:3])
    fresh = GaLoreAdamW(galore_groups(ref, rank=3, update_proj_gap=2), lr=1e-2)
    for factor, xy in zip([1e-3, 1e-3 + 0.999 / 2, 1.0], data[3:]):
        for group in fresh.param_groups:
            group["lr"] = 1e-2 * factor
        _run(fresh, ref, [xy])
    assert params_equal(model, ref)
    assert all(not st for st in opt.state.values())  # reset again at the end of step 6


def test_first_moment_reset_keeps_the_rest():
    model = make_net()
    opt = GaLoreAdamW(galore_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    opt.enable_restarts(2, "first", recovery_steps=0)
    _run(opt, model, batches(2))
    st = opt.state[model.mid.weight]
    assert st["step"] == 2 and not st["exp_avg"].any() and st["exp_avg_sq"].any() and "proj_ortho" in st


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw", "galore_adamw8bit"])
def test_resume_mid_cycle_is_exact(name):
    config = OptimizerConfig(name, rank=3, update_proj_gap=2, lr=1e-2, reset_every=3, recovery_steps=2,
                             target_modules=["up", "mid", "down"],
                             optimizer_kwargs={"min_8bit_size": 16} if name.endswith("8bit") else {})
    data = batches(8)
    ref = make_net()
    _run(build_optimizer(ref, config), ref, data)
    model = make_net()
    opt = build_optimizer(model, config)
    _run(opt, model, data[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt = build_optimizer(model, config)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    assert opt.param_groups[0]["cycle_step"] == 4
    _run(opt, model, data[4:])
    assert params_equal(model, ref)


def test_config_refactorize_on_lora_and_refusals():
    model = _lora_model()
    opt = build_optimizer(model, OptimizerConfig("galore_adamw", rank=2, reset_every=2, refactorize=True,
                                                 target_modules=["0", "2"]))
    assert len(opt.restarts.pairs) == 2
    with pytest.raises(ValueError, match="reset_every"):
        OptimizerConfig("galore_adamw", refactorize=True)
    with pytest.raises(ValueError, match="no trainable low-rank factor pair"):
        build_optimizer(make_net(), OptimizerConfig("galore_adamw", rank=2, reset_every=2, refactorize=True,
                                                    target_modules=["mid"]))
    with pytest.raises(ValueError, match="reset_moments"):
        OptimizerConfig("galore_adamw", reset_every=2, reset_moments="second")
