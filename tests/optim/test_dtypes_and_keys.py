"""Every optimizer of ``OPTIMIZERS`` trains, saves and resumes bit-exactly in bf16 and fp16 as in fp32 (state tensors
keep their dtypes through ``load_state_dict``); param-group keys are checked; reference spellings are aliases."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from leantune.optim import OPTIMIZERS, FiraAdamW, GaLoreAdamW, OptimizerConfig, build_optimizer
from tests.optim.helpers import assert_lockstep, batches, galore_groups, make_net, params_equal, rank_options


class WideNet(nn.Module):
    """A 300x300 weight: DCT column indices above 256 (not representable in bf16) and 8-bit blocks of many absmax."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 300)
        self.mid = nn.Linear(300, 300)
        self.out = nn.Linear(300, 6)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def _net(dtype):
    torch.manual_seed(0)
    return WideNet().to(dtype)


def _optimizer(name, model, layerwise=False):
    config = OptimizerConfig(name, **rank_options(name, 6), update_proj_gap=3, lr=1e-3, layerwise=layerwise,
                             optimizer_kwargs={"min_8bit_size": 64} if name.endswith("8bit") else {})
    return build_optimizer(model, config)


def _steps(model, opt, data, dtype):
    for x, y in data:
        loss = ((model(x.to(dtype)) - y.to(dtype)) ** 2).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_train_save_resume_bit_exact_in_every_dtype(name, dtype, layerwise):
    dt = DTYPES[dtype]
    data = batches(8)
    if dt == torch.float16 and name != "galore_adafactor":  # Adam moments in fp16 would turn NaN: refused at setup
        with pytest.raises(ValueError, match="fp16.*master weights"):
            _optimizer(name, _net(dt), layerwise)
        return
    ref = _net(dt)
    ref_opt = _optimizer(name, ref, layerwise)
    _steps(ref, ref_opt, data, dt)
    assert not params_equal(ref, _net(dt))  # it trained

    model = _net(dt)
    opt = _optimizer(name, model, layerwise)
    _steps(model, opt, data[:4], dt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain tensors and values only
    resumed = _net(dt)
    opt2 = _optimizer(name, resumed, layerwise)  # first: Q-GaLore makes the model's INT8 layers the checkpoint holds
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for p, p2 in zip(opt.state, opt2.state):  # every state tensor kept its dtype (int32 indices, fp32 absmax ...)
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert opt2.state[p2][key].dtype == value.dtype, (key, value.dtype)
    _steps(resumed, opt2, data[4:], dt)
    assert params_equal(ref, resumed)


def test_fira_takes_the_fira_packages_groups_unchanged_and_matches_it_bitwise():
    fira = pytest.importorskip("fira")
    data = batches(12)
    ref_model, our_model = make_net(), make_net()
    keys = dict(rank=4, update_proj_gap=5, alpha=0.25, proj_type="std")  # the fira package's spelling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = fira.FiraAdamW(galore_groups(ref_model, **keys), lr=3e-3)
    ours = FiraAdamW(galore_groups(our_model, **keys), lr=3e-3, reference_adam=True)
    assert ours.param_groups[1]["scale"] == 0.25 and "alpha" not in ours.param_groups[1]
    assert_lockstep(ref_model, ref, our_model, ours, data)


@pytest.mark.parametrize("cls,group,match", [
    (FiraAdamW, {"rank": 4, "alpah": 0.25}, r"unknown key\(s\) \['alpah'\].*accepted: .*'alpha'"),
    (GaLoreAdamW, {"rank": 4, "alpha": 0.25}, r"unknown key\(s\) \['alpha'\]"),  # alpha is Fira's, not GaLore's
    (GaLoreAdamW, {"rank": 4, "proj_type": "reverse_std"}, "proj_type='reverse_std' is not supported"),
    (FiraAdamW, {"rank": 4, "alpha": 0.5, "scale": 0.25}, "give one"),
])
def test_bad_group_keys_raise_naming_them(cls, group, match):
    model = make_net()
    with pytest.raises(ValueError, match=match):
        cls([{"params": [model.up.weight], **group}], lr=1e-3)


def test_unknown_optimizer_kwargs_raise_naming_the_accepted_ones():
    with pytest.raises(ValueError, match=r"\['gama'\] are not options of FiraAdamW.*'gamma'"):
        build_optimizer(make_net(), OptimizerConfig("fira_adamw", rank=4, target_modules=["up"],
                                                    optimizer_kwargs={"gama": 1.02}))
