"""Q-GaLore under DDP (gloo, 2 CPU processes): DDP does not see the INT8 weights' gradients (they are not ``.grad``),
so the optimizer averages them itself; the stochastic rounding noise is seeded per parameter and step, so both ranks
keep bitwise identical INT8 codes and scales without exchanging them — with ``step()`` and with per-layer updates
(``attach_ddp``) — and the loss follows one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.distributed.helpers import batches, shard, spawn, tiny_llama

STEPS = 6


def _train(rank: int | None, layerwise: bool, offload: bool = False) -> dict:
    from leantune.optim import OptimizerConfig, build_optimizer

    model = tiny_llama(torch.float64)
    opt = build_optimizer(model, OptimizerConfig("q_galore_adamw", rank=4, update_proj_gap=2, lr=1e-2,
                                                 layerwise=layerwise, optimizer_kwargs={"lazy_queue": 2},
                                                 offload="cpu" if offload else None))
    torch.manual_seed(1000 + (rank or 0))  # each rank's global RNG differs: the SR noise must not depend on it
    runner = model if rank is None else DDP(model)  # after the INT8 layers were made
    if layerwise and rank is not None:
        opt.attach_ddp(runner)
    losses = []
    for ids in batches(STEPS):
        ids = ids if rank is None else shard(ids, rank)
        loss = runner(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    losses = torch.stack(losses)
    if rank is not None:
        torch.distributed.all_reduce(losses)
        losses = losses / 2
    return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": losses}


@pytest.mark.parametrize("layerwise, offload", [
    pytest.param(False, False, marks=pytest.mark.slow),  # make test-slow: ~25 s each on 2 cores
    pytest.param(True, False, marks=pytest.mark.slow),
    (True, True)], ids=["step", "layerwise", "layerwise-offload"])
def test_qgalore_ranks_identical_and_follow_one_process(tmp_path, layerwise, offload):
    """… also with the optimizer state on the host between updates (offload.py)."""
    ranks = spawn(_train, tmp_path, layerwise, offload)
    single = _train(None, layerwise, offload)
    int8 = [k[: -len("_scale")] for k in single["weights"] if k.endswith("weight_scale")]  # (state_dict: deq(W))
    assert len(int8) == 14  # 7 projections × 2 layers
    for key in single["weights"]:
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key
    torch.testing.assert_close(ranks[0]["losses"], single["losses"], rtol=1e-4, atol=0)
    moved = sum(int((ranks[0]["weights"][k] != tiny_int8(k)).sum()) for k in int8)
    assert moved > 0  # the INT8 codes were trained


def tiny_int8(key: str) -> torch.Tensor:
    """deq(W) of the untrained INT8 model (nearest rounding of its initial weights)."""
    from leantune.optim import quantize_weights

    model = tiny_llama(torch.float64)
    quantize_weights(model)
    return model.state_dict()[key]


def _fsdp2_refusal(rank: int) -> str:
    import leantune
    from leantune.optim import OptimizerConfig, build_optimizer

    model = leantune.shard_model(tiny_llama(torch.float32))
    try:
        build_optimizer(model, OptimizerConfig("q_galore_adamw", rank=4))
    except ValueError as err:
        return str(err)
    return "built"


def test_qgalore_is_refused_under_fsdp2_with_the_reason(tmp_path):
    for message in spawn(_fsdp2_refusal, tmp_path):
        assert "FSDP2-sharded" in message and "not supported" in message and "scale per block" in message
        assert "under DDP" in message
