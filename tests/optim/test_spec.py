"""Every optimizer's spec (``leantune/optim/spec.py``) is what the planner predicts and what the optimizer keeps:
the planner's state bytes equal ``optimizer_state_bytes`` of the built optimizer after real steps (a projector
refresh included), for every entry of OPTIMIZERS, in fp32 and bf16 — so a new optimizer cannot forget the planner.
Its capabilities are the ones the classes enforce."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantune.kernels.int8_linear import is_int8_weight
from leantune.optim import OPTIMIZERS, OptimizerConfig, build_optimizer, optimizer_state_bytes
from leantune.optim.sharded import ROW_SHARDABLE_OPTIMIZERS
from leantune.plan import estimate


class Net(nn.Module):
    """Projected matrices on both sides of the r × M rule (64 × 48: right-projected; 160 × 64: left, 8-bit
    moments from 4096 numbers on), an untargeted embedding above 4096 numbers, biases and a norm weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 48)
        self.lin1 = nn.Linear(48, 64)
        self.lin2 = nn.Linear(64, 160)
        self.norm = nn.LayerNorm(160)
        self.head = nn.Linear(160, 8)

    def forward(self, ids):
        return self.head(self.norm(self.lin2(torch.tanh(self.lin1(self.emb(ids)))))).float().square().mean()


def _check(name, dtype, projector=None, **options):
    torch.manual_seed(0)
    net = Net().to(dtype)
    spec = OPTIMIZERS[name]
    rank = None if spec.rank is None or spec.fixed_rank else 32
    opt = build_optimizer(net, OptimizerConfig(name, rank=rank, target_modules=["lin1", "lin2"], update_proj_gap=2,
                                               lr=1e-3, projector=projector, optimizer_kwargs=options))
    ids = torch.randint(0, 100, (4, 6))
    for _ in range(3):  # steps 1-3: the projectors are built at step 1 and refreshed at step 3
        net(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    targets = {id(net.lin1.weight), id(net.lin2.weight)}
    trainable = [p for p in net.parameters() if p.requires_grad or is_int8_weight(p)]  # Q-GaLore's INT8 weights
    predicted = estimate.optimizer_state_bytes(name, trainable, targets, rank=rank, projector=projector,
                                               options=options)
    assert predicted == optimizer_state_bytes(opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_planner_state_bytes_equal_measured(name, dtype):
    _check(name, dtype)


@pytest.mark.parametrize("name, projector, options", [
    ("galore_adamw", "dct", {}), ("galore_adamw", "svd2", {}), ("galore_adamw", "random", {}),
    ("galore_adamw8bit", "rsvd", {}), ("fira_adamw", "dct", {}), ("galore_adafactor", None, {"beta1": 0.9}),
    ("natural_galore_adamw", None, {"history_size": 2}),
])
def test_planner_follows_projector_and_options(name, projector, options):
    _check(name, torch.bfloat16, projector, **options)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_capabilities_are_the_classes(name):
    spec = OPTIMIZERS[name]
    assert spec.row_shardable == (name in ROW_SHARDABLE_OPTIMIZERS)
    assert spec.row_shardable == (spec.cls.row_shardable and spec.projector in ("svd", "rsvd", "dct"))
    assert ("rotate" in spec.moment_policies) == spec.cls.supports_rotate
    assert spec.fusable == bool(getattr(spec.cls, "fusable", False))
    assert spec.summary


@pytest.mark.parametrize("projector", ["svd", "rsvd", "dct", "random", "svd2"])
def test_each_projector_declares_the_state_it_writes(projector):
    """A projector's ``state_keys`` (their union is what a checkpoint may hold) name every key it writes."""
    from leantune.optim.projector_kinds import make_projector

    net = Net()
    name = "gradnorm_lorp" if projector == "svd2" else "galore_adamw"
    opt = build_optimizer(net, OptimizerConfig(name, rank=8, target_modules=["lin2"], projector=projector, lr=1e-3))
    for _ in range(2):
        net(torch.randint(0, 100, (2, 3))).backward()
        opt.step()
        opt.zero_grad()
    group = next(g for g in opt.param_groups if "rank" in g)
    state = opt.state[net.lin2.weight]
    written = {key for key in state if key.startswith("proj_")}  # the optimizer's own keys are not "proj_"
    declared = set(type(make_projector(projector, state, group)).state_keys)
    assert written and written <= declared, (written, declared)
