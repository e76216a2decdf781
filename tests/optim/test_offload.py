"""Optimizer state kept on the host between updates (``OptimizerConfig(offload="cpu")``, ``leantune/optim/offload.py``).

On the CPU the "device" copies are separate tensors, so the bookkeeping (copy in, step, copy back, prefetch the next
parameter, the byte ledger) runs as on a GPU; the weights and state dicts must be bitwise those without offload —
with an LR schedule, per-parameter clipping, gradient accumulation, per-layer updates, and across save/resume."""

from __future__ import annotations

import io

import pytest
import torch

from leantune.optim import OptimizerConfig, build_optimizer, optimizer_state_bytes
from tests.optim.helpers import batches, loss_fn, make_net, rank_options

NAMES = ["galore_adamw", "galore_adamw8bit", "fira_adamw", "apollo_adamw", "galore_adafactor", "q_galore_adamw8bit",
         "conda_adamw"]


def _build(name, layerwise, offload, accumulation=1):
    model = make_net()
    opt = build_optimizer(model, OptimizerConfig(
        name, **rank_options(name, 4), update_proj_gap=2, lr=1e-2, layerwise=layerwise, offload=offload,
        max_grad_norm_per_param=0.5, accumulation_steps=accumulation if layerwise else 1,
        optimizer_kwargs={"min_8bit_size": 64} if name.endswith("8bit") else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train(model, opt, sched, data, accumulation=1):
    for i, xy in enumerate(data):
        (loss_fn(model, xy) / accumulation).backward()
        if (i + 1) % accumulation == 0:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)


def _state_equal(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for key, value in sa[pid].items():
            other = sb[pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (pid, key)


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name", NAMES)
def test_offloaded_equals_on_device_bit_for_bit(name, layerwise):
    accumulation = 2
    data = batches(12)
    ref = _build(name, layerwise, None, accumulation)
    off = _build(name, layerwise, "cpu", accumulation)
    assert off[1].offload is not None and ref[1].offload is None
    _train(*ref, data, accumulation)
    _train(*off, data, accumulation)
    for x, y in zip(ref[0].state_dict().values(), off[0].state_dict().values()):
        assert torch.equal(x, y)
    _state_equal(ref[1], off[1])
    ledger = off[1].offload.ledger()
    assert ledger["device_bytes"] == 0  # between steps everything is on the host
    assert ledger["host_bytes"] == sum(v.numel() * v.element_size() for s in ref[1].state.values()
                                       for v in s.values() if torch.is_tensor(v))
    largest = max(sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
                  for s in ref[1].state.values())
    assert 0 < ledger["peak_device_bytes"] <= 2 * largest  # the stepping parameter and the prefetched next one


def test_state_lives_in_host_tensors_between_updates_and_prefetch_follows_the_last_order():
    model, opt, sched = _build("galore_adamw", True, "cpu")
    _train(model, opt, sched, batches(2))
    off = opt.offload
    assert len(off._order) == len([p for p in model.parameters() if p.requires_grad])
    seen_during = []
    original = off.on_device

    def spy(p):
        seen_during.append((p, dict(off._prefetched)))
        return original(p)

    off.on_device = spy
    _train(model, opt, sched, batches(1, seed=9))
    # from the second update of a step on, the parameter stepping was prefetched by the one before it
    assert all(p in prefetched for p, prefetched in seen_during[1:])
    assert optimizer_state_bytes(opt) == off.ledger()["host_bytes"]


def test_save_and_resume_with_offload_bit_exact():
    data = batches(8)
    full = _build("galore_adamw8bit", True, "cpu")
    _train(*full, data)
    half = _build("galore_adamw8bit", True, "cpu")
    _train(*half, data[:4])
    buf = io.BytesIO()
    torch.save({"model": half[0].state_dict(), "opt": half[1].state_dict(), "sched": half[2].state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _build("galore_adamw8bit", True, "cpu")
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    assert resumed[1].offload.ledger()["device_bytes"] == 0
    _train(*resumed, data[4:])
    for x, y in zip(full[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(x, y)
    _state_equal(full[1], resumed[1])


def test_offload_in_trainer_resumes_bit_exact(tmp_path):
    from tests.optim.test_trainer_lisa import make_trainer, same, weights

    config = OptimizerConfig(name="galore_adamw", rank=4, update_proj_gap=2, layerwise=True, offload="cpu")
    full = make_trainer(tmp_path, "full", config)
    full.train()
    assert full.optimizer.optimizer.offload is not None
    resumed = make_trainer(tmp_path, "full", config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert same(weights(full.model), weights(resumed.model))
    plain = make_trainer(tmp_path, "plain", OptimizerConfig(name="galore_adamw", rank=4, update_proj_gap=2,
                                                            layerwise=True))
    plain.train()
    assert same(weights(full.model), weights(plain.model))


def test_offload_refusals():
    with pytest.raises(ValueError, match="offload"):
        OptimizerConfig("galore_adamw", offload="nvme")
    model = make_net()
    opt = build_optimizer(model, OptimizerConfig("galore_adamw", rank=4))
    with pytest.raises(ValueError, match="can be kept in"):
        opt.enable_offload("disk")
