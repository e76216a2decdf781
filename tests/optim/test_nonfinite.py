"""A NaN/inf gradient never reaches the weights: every optimizer skips that parameter's update (with a warning), at a
projector refresh and between refreshes, stepping or per-layer; LeanTuneCallback skips a Trainer step."""

from __future__ import annotations

import warnings

import pytest
import torch

from leantune.kernels.int8_linear import is_int8_weight
from leantune.optim import OPTIMIZERS, NonFiniteGradientWarning, OptimizerConfig, build_optimizer
from tests.optim.helpers import batches, loss_fn, make_net, rank_options


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("bad_step", [0, 1], ids=["at-refresh", "between-refreshes"])  # T = 2: refresh at 0, 2, ...
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nan_gradient_skips_the_parameter_and_the_rest_trains(name, bad_step, layerwise):
    model = make_net()
    opt = build_optimizer(model, OptimizerConfig(name, **rank_options(name, 4), update_proj_gap=2, lr=1e-2, layerwise=layerwise,
                                                 target_modules=["up", "mid", "down"]))
    poisoned = model.mid.weight
    for step, xy in enumerate(batches(4)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = {k: v.clone() if isinstance(v, torch.Tensor) else v
                        for k, v in opt.state.get(poisoned, {}).items()}
        int8 = is_int8_weight(poisoned)  # Q-GaLore: its gradient is ``qgrad``, handed over by the INT8 linear
        if step == bad_step and layerwise:
            if int8:
                stepper = poisoned.qgrad_hook
                poisoned.qgrad_hook = lambda w: (w.qgrad.fill_(float("nan")), stepper(w))
            else:
                poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_fn(model, xy).backward()
            if step == bad_step and not layerwise:
                (poisoned.qgrad if int8 else poisoned.grad)[0, 0] = float("inf")
            opt.step()
            opt.zero_grad()
        if step == bad_step and layerwise:
            if int8:
                poisoned.qgrad_hook = stepper
            else:
                poisoned._backward_hooks.clear()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if step == bad_step:
            assert any(issubclass(w.category, NonFiniteGradientWarning) for w in caught)
            assert torch.equal(poisoned, before["mid.weight"])  # skipped ...
            for key, value in state_before.items():  # ... with its state untouched
                same = torch.equal(opt.state[poisoned][key], value) if isinstance(value, torch.Tensor) else \
                    opt.state[poisoned][key] == value
                assert same, key
            assert not torch.equal(model.up.weight, before["up.weight"])  # the rest trained
        else:
            assert not torch.equal(poisoned, before["mid.weight"])


def test_callback_skips_a_trainer_step_with_nan_gradients(tmp_path):
    from transformers import TrainerCallback

    import leantune
    from tests.integrations.test_callback import make_trainer

    class Poison(TrainerCallback):  # a NaN gradient in one adapter matrix at the second step
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("nan"))

    callback = leantune.LeanTuneCallback(adapter=leantune.LoraXSConfig(r=4, target_modules=["query", "value"],
                                                                       task_type="SEQ_CLS"), verbose=False)
    trainer = make_trainer(tmp_path, callback, max_steps=3)
    trainer.callback_handler.callbacks.insert(0, Poison())  # before the guard, as a bad batch would be
    snapshots = []
    trainer.add_callback(type("Snap", (TrainerCallback,), {"on_step_end": lambda self, a, s, c, model=None, **k:
                              snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()
                                                if p.requires_grad})})())
    with pytest.warns(NonFiniteGradientWarning, match="step 2 has NaN/inf gradients"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.equal(snapshots[1][n], snapshots[0][n]) for n in snapshots[0])  # step 2 changed nothing
    assert any(not torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[0])  # step 3 trained again
