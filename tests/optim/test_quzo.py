"""QuZO (``leantune.optim.quzo``): the stochastic rounding, the unbiasedness that needs two independent roundings
(measured on a quadratic, where the central difference is exact), seeds and restoration, the update by hand, and
training through ``LeanTuneCallback`` + ``Trainer`` with no backward pass, on a 4-bit base with an adapter and on
full parameters, resumed bit for bit."""

from __future__ import annotations

import datasets
import pytest
import torch
import transformers as T
from torch.autograd.graph import saved_tensors_hooks

import leantune
from leantune.optim import QuZO, QuZOConfig
from leantune.optim.quzo import stochastic_round


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    u = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([stochastic_round(u, 2, gen) for _ in range(40000)])
    lo, step = u.min(), (u.max() - u.min()) / 3
    levels = (draws - lo) / step
    assert torch.allclose(levels, levels.round(), atol=1e-9) and levels.min() >= 0 and levels.max() <= 3
    # E[Q(u)] = u: the mean of 40,000 draws within 4 standard errors (Bernoulli variance ≤ step²/4)
    assert ((draws.mean(0) - u).abs() <= 4 * (step / 2) / 40000 ** 0.5).all()
    assert torch.equal(stochastic_round(u, None, gen), u)


def _quadratic():
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    h = m @ m.T / 6 + torch.eye(6, dtype=torch.float64)
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    return theta, (lambda: 0.5 * theta @ h @ theta + g @ theta), h @ theta.detach() + g


def test_estimate_is_unbiased_only_with_independent_roundings():
    """At 2 bits, E[μ u₂] = ∇L when the update's u₂ and the probe's u₁ are independent roundings of one Gaussian u,
    while reusing the probe's rounding (the authors' code; spec §4) gives (I + E[diag Var(Q(u)|u)])∇L. Both are
    measured on the same draws (common random numbers), so their difference is sharp."""
    theta, loss, grad = _quadratic()
    opt = QuZO([theta], lr=0.0, eps=1e-3, bits=2)
    n = 8000
    independent, reused = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for _ in range(n):
        opt.estimate(loss)
        mu = float(opt._pending[0])
        independent += mu * opt._direction(theta, 0, 0, 2).double()
        reused += mu * opt._direction(theta, 0, 0, 1).double()
        opt._pending = None
        opt.param_groups[0]["step"] += 1  # a new direction, θ unchanged (lr 0)
    ratio = {name: float(total / n @ grad / (grad @ grad)) for name, total in
             (("independent", independent), ("reused", reused))}
    assert abs(ratio["independent"] - 1) < 0.06 and float((independent / n - grad).norm() / grad.norm()) < 0.12
    assert ratio["reused"] - ratio["independent"] > 0.04, ratio  # measured ≈ 1.09 against ≈ 1.0


def test_seeds_restore_and_update_by_hand():
    theta, loss, _ = _quadratic()
    start = theta.detach().clone()
    opt = QuZO([theta], lr=0.1, eps=1e-2, bits=4, seed=7, weight_decay=0.01)
    u1 = opt._direction(theta, 0, 0, 1)
    assert torch.equal(u1, opt._direction(theta, 0, 0, 1))  # regenerated identically in every phase
    assert not torch.equal(u1, opt._direction(theta, 0, 0, 2))  # the update's rounding is another draw
    opt.estimate(loss)
    torch.testing.assert_close(theta.detach(), start, rtol=0, atol=1e-15)  # +ε, −2ε, +ε restores θ
    mu = float(opt._pending[0])
    u2 = opt._direction(theta, 0, 0, 2)
    opt.step()
    want = start * (1 - 0.1 * 0.01) - 0.1 * mu * u2.double()
    torch.testing.assert_close(theta.detach(), want, rtol=0, atol=1e-15)
    twin_theta, twin_loss, _ = _quadratic()  # another "rank" with the same seed moves the same way
    twin = QuZO([twin_theta], lr=0.1, eps=1e-2, bits=4, seed=7, weight_decay=0.01)
    twin.step(twin_loss)
    assert torch.equal(twin_theta, theta)
    with pytest.raises(RuntimeError, match="no estimate"):
        opt.step()
    with pytest.raises(ValueError, match="QuZOConfig.eps"):
        QuZO([theta], eps=0.0)


def test_weights_stay_on_their_grid_and_the_rounded_update_is_unbiased():
    """Spec §7.12: with ``weight_bits`` θ is rounded onto multiples of δ = max|θ₀|/(2^(b−1)−1) at the first step and
    stays there after every update; the stochastically rounded update has the exact update as its mean (measured
    over 4,000 rounding seeds in float64: within 4 standard errors, Bernoulli variance ≤ δ²/4)."""
    theta, loss, _ = _quadratic()
    delta = float(theta.detach().abs().max()) / 7
    opt = QuZO([theta], lr=0.05, eps=1e-3, bits=4, weight_bits=4, seed=1)
    for _ in range(5):
        opt.step(loss)
        levels = theta.detach() / delta
        assert torch.allclose(levels, levels.round(), rtol=0, atol=1e-12) and levels.abs().max() <= 7
    assert opt.state[theta]["grid_step"] == delta
    opt.estimate(loss)
    start, mu = theta.detach().clone(), opt._pending.clone()
    exact = start - 0.05 * float(mu[0]) * opt._direction(theta, 0, 0, 2).double()
    assert ((exact - start).abs() / delta).max() > 0.2  # the update is a sizeable fraction of a grid step
    u2 = opt._direction(theta, 0, 0, 2)
    opt._direction = lambda *args: u2  # hold the direction fixed; only the rounding stream (the seed) varies
    draws = []
    for seed in range(4000):
        theta.data.copy_(start)
        opt.seed = seed
        opt._grid_update(theta, 0, mu, 0.05, 0.0)
        draws.append(theta.detach().clone())
    draws = torch.stack(draws)
    levels = draws / delta
    assert torch.allclose(levels, levels.round(), rtol=0, atol=1e-12)
    inside = exact.abs() <= 7 * delta  # outside the grid's range the update is clipped to ±7δ (and biased)
    assert 0 < inside.sum() < 6 and torch.allclose(draws[:, ~inside].abs(), torch.full_like(draws[:, ~inside],
                                                                                              7 * delta))
    assert ((draws - exact).abs()[:, inside] <= delta * (1 + 1e-9)).all()  # one of the two neighbouring points
    assert ((draws.mean(0) - exact).abs()[inside] <= 4 * (delta / 2) / 4000 ** 0.5).all()
    with pytest.raises(ValueError, match="all zero"):
        QuZO([torch.nn.Parameter(torch.zeros(3))], weight_bits=8).step(lambda: torch.tensor(0.0))


def _llama(quantized: bool, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    if quantized:  # a 4-bit base, as QLoRA's: every decoder linear in bitsandbytes NF4
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        four = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                 compute_dtype=dtype, quant_type="nf4")
                        four.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False,
                                                        quant_type="nf4",
                                                        compress_statistics=False)._quantize("cpu")
                        setattr(parent, name, four)
    return model


def _trainer(tmp, quantized: bool, steps: int = 6, adapter: bool | None = None, dtype=torch.float32,
             weight_bits=None):
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = T.TrainingArguments(output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, learning_rate=2e-3, lr_scheduler_type="linear",
                               save_strategy="steps", save_steps=steps // 2, report_to=[], use_cpu=True,
                               disable_tqdm=True, seed=0, logging_steps=1)
    adapter = quantized if adapter is None else adapter
    config = leantune.ALLoRAConfig(r=4, target_modules="all-linear") if adapter else None
    optimizer = QuZOConfig(eps=1e-2, bits=4, weight_bits=weight_bits)
    callback = leantune.LeanTuneCallback(adapter=config, optimizer=optimizer, verbose=False)
    return callback.setup(T.Trainer(model=_llama(quantized, dtype), args=args, train_dataset=data))


BF16 = torch.bfloat16
CASES = {"4bit-base+ALLoRA": (True, True, torch.float32, None), "fp32-base+ALLoRA": (False, True, torch.float32, None),
         "full-parameters": (False, False, torch.float32, None), "bf16-4bit-base+ALLoRA": (True, True, BF16, None),
         "bf16-full-parameters-on-an-INT8-grid": (False, False, BF16, 8)}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_without_backward_resumes(case, tmp_path):
    """Forward passes only (no saved activation, no gradient), the weights move, and resume_from_checkpoint continues
    bit for bit, on a bitsandbytes 4-bit base too (its AVX512-BF16-only eval repack, which rounded absmax to bf16 at
    a time that differed between the two runs, is switched off: ``leantune._utils.one_bnb_cpu_path``)."""
    quantized, adapter, dtype, weight_bits = CASES[case]
    saved = []
    trainer = _trainer(tmp_path / "run", quantized, adapter=adapter, dtype=dtype, weight_bits=weight_bits)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        trainer.train()
    assert not saved  # no activation saved for a backward: forward passes only
    assert all(p.grad is None for p in trainer.model.parameters())
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(final[n], start[n]) for n in final)
    if weight_bits is not None:  # every trained tensor on its INT8 grid (spec §7.12), in bf16
        quzo = trainer.optimizer.optimizer
        for p in (p for group in quzo.param_groups for p in group["params"]):
            step = quzo.state[p]["grid_step"]
            levels = torch.round(p.detach().float() / step)
            assert torch.equal(p.detach(), (levels * step).to(p.dtype)) and levels.abs().max() <= 127
    resumed = _trainer(tmp_path / "run", quantized, adapter=adapter, dtype=dtype, weight_bits=weight_bits)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), final[name]), name
    assert resumed.optimizer.optimizer.step_count == 6
