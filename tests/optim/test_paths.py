"""Each optimizer's readable update rule and its fast twins compute the same step.

``readable`` is the formula of the optimizer's docstring as written (and, with ``reference_adam``, galore-torch's /
fira's arithmetic: bitwise parity tests in test_exactness.py); ``gemm`` (decay + back-projection + update as one
GEMM into W; Fira: S₀ by one GEMM) and ``merged`` (Fira: S₀ never formed) reorder the arithmetic, so they equal it to
rounding — checked in float64 to 1e-12 relative over steps with projector refreshes, weight decay and Fira's limiter,
and in bf16 to a few roundings for one step from the same state. ``fused`` (the CUDA kernel, fp32 arithmetic) is
checked against the default path in tests/kernels/test_optimizer_step.py and here against the readable rule.
``GaLoreAdamW.path`` is the one rule that picks among them; ``force_path`` pins one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leantune.optim import OPTIMIZERS, OptimizerConfig, build_optimizer


def _net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 16)).to(dtype)  # right and left projection


def _train(name, path, dtype, steps, state=None, **kwargs):
    net = _net(dtype)
    rank = {} if OPTIMIZERS[name].fixed_rank else {"rank": 4}
    opt = build_optimizer(net, OptimizerConfig(name, **rank, update_proj_gap=3, lr=1e-2, weight_decay=0.1,
                                               target_modules=["0", "2"], **kwargs))
    opt.force_path = path
    if state is not None:
        net.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 24, generator=g).to(dtype), torch.randn(8, 16, generator=g).to(dtype))
               for _ in range(steps)]
    for x, y in batches:
        (net(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


TWINS = [(name, path) for name in ("galore_adamw", "rsvd_galore_adamw", "dct_adamw", "galore_adamw8bit",
                                   "natural_galore_adamw", "fira_adamw", "dct_fira_adamw", "apollo_adamw",
                                   "apollo_mini", "galore_adafactor")
         for path in OPTIMIZERS[name].cls.paths if path not in ("readable", "fused")]


@pytest.mark.parametrize("name, path", TWINS, ids=[f"{n}-{p}" for n, p in TWINS])
def test_twin_equals_readable_rule_float64(name, path):
    kwargs = {"scale": 2.0} if path == "merged" and name == "dct_fira_adamw" else {}  # merged needs |1 − α| ≥ 1/2
    twin, _ = _train(name, path, torch.float64, 7, **kwargs)
    readable, _ = _train(name, "readable", torch.float64, 7, **kwargs)
    start = _net(torch.float64)
    for (label, a), b, w0 in zip(twin.named_parameters(), readable.parameters(), start.parameters()):
        assert not torch.equal(b, w0), label  # it trained
        a, b = a.detach(), b.detach()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max())), (label, float((a - b).abs().max()))


@pytest.mark.parametrize("name, path", [t for t in TWINS if t[0] in ("galore_adamw", "fira_adamw")],
                         ids=["galore-gemm", "fira-gemm", "fira-merged"])
def test_twin_within_rounding_of_readable_rule_bf16(name, path):
    net, opt = _train(name, "readable", torch.bfloat16, 4)
    state = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()))
    twin, _ = _train(name, path, torch.bfloat16, 1, state)
    readable, _ = _train(name, "readable", torch.bfloat16, 1, state)
    for (label, a), b, w in zip(twin.named_parameters(), readable.parameters(), net.parameters()):
        assert not torch.equal(b, w), label
        ulp = torch.finfo(torch.bfloat16).eps * (w.abs() + (a - w).abs() + (b - w).abs()).float()
        assert bool(((a - b).float().abs() <= 2 * ulp).all()), label


def test_the_rule_picks_gemm_on_cpu_merged_for_fira_and_readable_for_the_references():
    from leantune.optim.projector_kinds import make_projector
    from leantune.optim.step import ParamStep

    net = _net(torch.float32)
    for name, kwargs, expected in [("galore_adamw", {}, "gemm"), ("galore_adamw", {"reference_adam": True}, "readable"),
                                   ("fira_adamw", {}, "merged"), ("dct_fira_adamw", {}, "gemm")]:
        opt = build_optimizer(net, OptimizerConfig(name, rank=4, target_modules=["0"], **kwargs))
        net[0].weight.grad = torch.randn_like(net[0].weight)
        opt.step()  # builds the projector
        group = next(g for g in opt.param_groups if "rank" in g and any(p is net[0].weight for p in g["params"]))
        state = opt.state[net[0].weight]
        s = ParamStep(net[0].weight.detach(), net[0].weight.grad, state, group,
                      make_projector(group["projector"], state, group))
        assert opt.path(s) == expected, name
        opt.force_path = "fused_nowhere"
        with pytest.raises(ValueError, match="computes by"):
            opt.path(s)


def test_forcing_fira_merged_where_it_does_not_apply_is_refused():
    with pytest.raises(ValueError, match="merged"):
        _train("dct_fira_adamw", "merged", torch.float32, 1)  # α = 1: |1 − α| < 1/2
