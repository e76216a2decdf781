"""Small models and training loops shared by the optim tests."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class TallWideNet(nn.Module):
    """Linear layers with tall (out > in), wide (out < in) and square weights, plus a bias and a norm."""

    def __init__(self, d_in: int = 12, hidden: int = 40, d_out: int = 6) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, hidden)  # weight 40 x 12: tall
        self.mid = nn.Linear(hidden, hidden, bias=False)  # square
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, d_out)  # weight 6 x 40: wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(torch.tanh(self.mid(torch.tanh(self.up(x))))))


def make_net(seed: int = 0) -> TallWideNet:
    torch.manual_seed(seed)
    return TallWideNet()


def batches(n: int, seed: int = 123, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randn(batch, 6, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def galore_groups(model: nn.Module, **low_rank: object) -> list[dict]:
    """galore-torch style groups: up/mid/down weights low-rank, the rest regular."""
    low = [model.up.weight, model.mid.weight, model.down.weight]
    ids = {id(p) for p in low}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": low, **low_rank}]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, scheduler=None, accumulation: int = 1,
          step_fn: Callable | None = None) -> list[float]:
    losses = []
    for i, xy in enumerate(data):
        loss = loss_fn(model, xy) / accumulation
        loss.backward()
        losses.append(float(loss.detach()))
        if (i + 1) % accumulation == 0:
            opt.step()
            if scheduler is not None:
                scheduler.step()
            opt.zero_grad(set_to_none=True)
    return losses


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def assert_lockstep(ref_model: nn.Module, ref: torch.optim.Optimizer, our_model: nn.Module,
                    ours: torch.optim.Optimizer, data) -> None:
    """Train a reference and our (model, optimizer) pair on ``data`` side by side; the weights must be bitwise equal
    after every step."""
    for step, xy in enumerate(data):
        for model, opt in ((ref_model, ref), (our_model, ours)):
            loss_fn(model, xy).backward()
            opt.step()
            opt.zero_grad()
        assert params_equal(ref_model, our_model), f"diverged at step {step}"


def rank_options(name: str, rank: int) -> dict:
    """``{"rank": rank}`` for optimizer names that take a rank (not Conda, not the rank-1 APOLLO-Mini)."""
    from leantune.optim import OPTIMIZERS

    return OPTIMIZERS[name].rank_options(rank)
