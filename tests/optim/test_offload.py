"""Optimizer state kept on the host between updates (``OptimizerConfig(offload="cpu")``, ``leantune/optim/offload.py``).

On the CPU the "device" copies are separate tensors, so the bookkeeping (copy in, step, copy back, prefetch the next
parameter, the byte ledger) runs as on a GPU; the weights and state dicts must be bitwise those without offload —
with an LR schedule, per-parameter clipping, gradient accumulation, per-layer updates, and across save/resume."""

from __future__ import annotations

import io

import pytest
import torch

from leantune.optim import OptimizerConfig, build_optimizer, optimizer_state_bytes
from leantune.optim.offload import STEP_PLACES, host_is_cheaper
from tests.optim.helpers import batches, loss_fn, make_net, rank_options

NAMES = ["galore_adamw", "galore_adamw8bit", "fira_adamw", "apollo_adamw", "galore_adafactor", "q_galore_adamw8bit",
         "conda_adamw"]


def _build(name, layerwise, offload, accumulation=1, step_on="auto"):
    model = make_net()
    opt = build_optimizer(model, OptimizerConfig(
        name, **rank_options(name, 4), update_proj_gap=2, lr=1e-2, layerwise=layerwise, offload=offload,
        offload_step=step_on,
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


@pytest.mark.parametrize("step_on", STEP_PLACES)
@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name", NAMES)
def test_offloaded_equals_on_device_bit_for_bit(name, layerwise, step_on):
    """Bitwise the run without offload wherever the updates run: on the device (the state comes in), on the host
    (the gradient and weight go out), or each where fewer bytes move ("auto")."""
    accumulation = 2
    data = batches(12)
    ref = _build(name, layerwise, None, accumulation)
    off = _build(name, layerwise, "cpu", accumulation, step_on)
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

    def nbytes(state):
        return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))

    # the rule, from the final state: which parameters step on the device ("auto" decides by the bytes moved)
    device_side = [p for p in ref[1].state if step_on == "device" or not p.is_floating_point() or (
        step_on == "auto" and not host_is_cheaper(nbytes(ref[1].state[p]), p.numel() * p.element_size(),
                                                  p.numel() * p.element_size(), off[1].offload.bandwidth_ratio))]
    largest = max((nbytes(ref[1].state[p]) for p in device_side), default=0)
    # the stepping parameter and the prefetched next one (a device-side parameter's first update may have come
    # before "auto" knew its state's size: bounded by the largest state)
    bound = 2 * max(largest, max(nbytes(s) for s in ref[1].state.values()) if step_on == "auto" else 0)
    assert ledger["peak_device_bytes"] <= bound
    if step_on == "host":
        assert ledger["peak_device_bytes"] == 0 or any(not p.is_floating_point() for p in ref[1].state)
    if step_on == "device":
        assert 0 < ledger["peak_device_bytes"] and off[1].offload.host_steps == 0
    if len(device_side) < len(ref[1].state):
        assert off[1].offload.host_steps > 0


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
    with pytest.raises(ValueError, match="offload_step"):
        OptimizerConfig("galore_adamw", offload="cpu", offload_step="gpu")
    with pytest.raises(ValueError, match="set offload='cpu' as well"):
        OptimizerConfig("galore_adamw", offload_step="host")
    model = make_net()
    opt = build_optimizer(model, OptimizerConfig("galore_adamw", rank=4))
    with pytest.raises(ValueError, match="can be kept in"):
        opt.enable_offload("disk")


def test_host_is_cheaper_counts_the_bytes_each_side_moves():
    """Device: 2·S over the bus. Host: G + 2·W over the bus, plus 2·S + G + 2·W through host memory at k times the
    bus's rate — the host wins when (G + 2W)(k + 1) < 2S(k − 1); k = inf: the bus alone (2S > G + 2W). By hand:"""
    n, inf = 1000, float("inf")
    assert host_is_cheaper(2 * 4 * n, 2 * n, 2 * n)  # fp32 moments of a bf16 weight: 6n·4 = 24n < 16n·2 = 32n
    assert not host_is_cheaper(2 * 4 * n, 4 * n, 4 * n)  # fp32 moments of an fp32 weight: 12n·4 = 48n > 32n
    assert host_is_cheaper(2 * 4 * n, 4 * n, 4 * n, inf)  # ... by the bus alone: 16n > 12n
    assert not host_is_cheaper(2 * 2 * n, 2 * n, 2 * n)  # bf16 moments of a bf16 weight: 24n > 16n
    assert host_is_cheaper(2 * 2 * n, 2 * n, 2 * n, inf)  # ... by the bus alone: 8n > 6n
    assert not host_is_cheaper(2 * n + 8 * (n // 256), 2 * n, 2 * n, inf)  # 8-bit moments: ~4n < 6n even so
    assert not host_is_cheaper(2 * 4 * 8 * 40 + 4 * 8 * 40, 4 * 40 * 40, 4 * 40 * 40, inf)  # rank-8 state of 40×40
    assert not host_is_cheaper(6, 3, 6, inf)  # equal bytes: stays on the device
    assert not host_is_cheaper(10 ** 9, 1, 1, 1.0)  # host memory no faster than the bus: never


def test_auto_keeps_every_update_of_an_fp32_galore_on_the_device_by_default():
    model, opt, sched = _build("galore_adamw", False, "cpu", step_on="auto")
    _train(model, opt, sched, batches(2))
    assert opt.offload.host_steps == 0 and opt.offload.ledger()["peak_device_bytes"] > 0


def test_auto_by_the_bus_alone_steps_plain_fp32_parameters_on_the_host_projected_ones_on_the_device():
    """With the bus counted alone (``bandwidth_ratio=inf``)."""
    model, opt, sched = _build("galore_adamw", False, "cpu", step_on="auto")
    off = opt.offload
    off.bandwidth_ratio = float("inf")
    where = {}
    on_host, on_device = off.on_host, off.on_device

    def spy_host(p, grad):
        where[id(p)] = "host"
        return on_host(p, grad)

    def spy_device(p):
        where[id(p)] = "device"
        return on_device(p)

    off.on_host, off.on_device = spy_host, spy_device
    _train(model, opt, sched, batches(3))
    projected = {id(model.up.weight), id(model.mid.weight), id(model.down.weight)}
    for name, p in model.named_parameters():
        assert where[id(p)] == ("device" if id(p) in projected else "host"), name
    largest = max(sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v))
                  for p in model.parameters() if id(p) in projected)
    assert 0 < off.ledger()["peak_device_bytes"] <= 2 * largest  # the host-stepped Adam states never came in
    assert off.host_steps == 3 * (len(list(model.parameters())) - 3)


@pytest.mark.parametrize("step_on", ["host", "device"])
@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw8bit", "fira_adamw"])
def test_offload_in_bf16_equals_no_offload_bit_for_bit(name, step_on):
    """bf16 weights and moments, per-layer updates with an LR schedule: each side bitwise the run without offload."""
    if name.endswith("8bit"):
        pytest.importorskip("bitsandbytes")
    data = [(x.bfloat16(), y.bfloat16()) for x, y in batches(6)]
    runs = []
    for offload in (None, "cpu"):
        model, opt, sched = _build(name, True, offload, 1, step_on if offload else "auto")
        model.to(torch.bfloat16)
        runs.append((model, opt))
        _train(model, opt, sched, data)
    (ref, ref_opt), (off, off_opt) = runs
    assert all(p.dtype == torch.bfloat16 for p in off.parameters())
    for x, y in zip(ref.state_dict().values(), off.state_dict().values()):
        assert torch.equal(x, y)
    _state_equal(ref_opt, off_opt)
    assert (off_opt.offload.host_steps > 0) == (step_on == "host")
