"""torch.distributed.checkpoint's zero-gradient init step (``leantune/optim/state_init.py``; spec
checkpoint_and_scaleout §6.6): on an optimizer that has not stepped, ``get_optimizer_state_dict`` runs ``step()`` with
zero gradients at lr 0. That step must not refresh a projector (no SVD, no gathered gradient), must leave the global
RNG as it was, and must create every state tensor with the shape, dtype and memory layout of a real step's. A load
over it then continues bit for bit, and a real step after it starts afresh, as if it had not happened. Under FSDP2
(2 processes, no bytes in the "refresh" phase) it is checked in ``tests/distributed/test_fsdp2_checkpoint.py``."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from leantune.optim import OPTIMIZERS, OptimizerConfig, build_optimizer
from leantune.optim.dct import DCTProjector
from leantune.optim.projectors import RandomizedSVDProjector, RandomProjector, SVDProjector, TwoSidedSVDProjector
from tests.distributed.helpers import batches, tiny_llama

#: (optimizer, whether its projectors take the stand-in: Conda's basis refreshes for real, as before). Q-GaLore is
#: not here: its INT8 weights get their gradients outside ``.grad`` (DSD gives them no zero gradient, so its init step
#: creates no state for them), and it is refused under FSDP2, where DSD is what saves optimizers.
NAMES = [("galore_adamw", True), ("galore_adamw8bit", True), ("galore_adafactor", True), ("fira_adamw", True),
         ("dct_adamw", True), ("dct_fira_adamw", True), ("rsvd_galore_adamw", True), ("apollo_adamw", True),
         ("natural_galore_adamw", True), ("gradnorm_lorp", True), ("conda_adamw", False)]
REFRESHES = [SVDProjector, RandomizedSVDProjector, TwoSidedSVDProjector, DCTProjector, RandomProjector]


def _setup(name: str, dtype: torch.dtype):
    model = tiny_llama(dtype)
    kwargs = {"min_8bit_size": 16} if name.endswith("8bit") else {}
    rank = 4 if OPTIMIZERS[name].rank is not None else None  # Conda: full-size state, no rank
    opt = build_optimizer(model, OptimizerConfig(name, lr=1e-2, rank=rank, update_proj_gap=2,
                                                 optimizer_kwargs=kwargs))
    return model, opt


def _train(model, opt, data) -> None:
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _layout(opt) -> dict:
    """What DCP loads into: each state tensor's shape, dtype and strides (values aside), and the other keys."""
    out = {}
    for i, (p, st) in enumerate(opt.state.items()):
        for key, value in st.items():
            out[(i, key)] = (tuple(value.shape), value.dtype, value.stride()) if isinstance(value, torch.Tensor) \
                else type(value)
    return out


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,stand_in", NAMES, ids=[n for n, _ in NAMES])
def test_init_step_is_shape_only(name, stand_in, dtype):
    if name.endswith("8bit"):
        pytest.importorskip("bitsandbytes")
        if dtype == torch.bfloat16:
            pytest.skip("8-bit moments are float32 only")
    data = batches(5)
    model, opt = _setup(name, dtype)  # the run without an init step
    _train(model, opt, data[:1])
    real = _layout(opt)

    model2, opt2 = _setup(name, dtype)
    before, rng = _weights(model2), torch.get_rng_state()
    refuse = [mock.patch.object(cls, "refresh", side_effect=AssertionError(f"{cls.__name__}.refresh ran"))
              for cls in (REFRESHES if stand_in else [])]
    for patch in refuse:
        patch.start()
    try:
        get_optimizer_state_dict(model2, opt2)  # runs the zero-gradient init step
    finally:
        for patch in refuse:
            patch.stop()
    assert torch.equal(torch.get_rng_state(), rng), "the init step drew from the global RNG"
    assert opt2.stand_in
    assert _layout(opt2) == real  # every key, shape, dtype and memory layout of a real step's state
    for key, value in _weights(model2).items():
        assert torch.equal(value, before[key]), f"the init step changed {key}"

    # a real step after it starts afresh: the same run as without the init step
    _train(model, opt, data[1:3])
    _train(model2, opt2, data[:3])
    assert not opt2.stand_in
    for key, value in _weights(model2).items():
        assert torch.equal(value, _weights(model)[key]), key

    # a load over it (what set_optimizer_state_dict does) continues bit for bit
    model3, opt3 = _setup(name, dtype)
    model3.load_state_dict(model.state_dict())
    get_optimizer_state_dict(model3, opt3)
    opt3.load_state_dict(opt.state_dict())
    assert not opt3.stand_in
    _train(model, opt, data[3:])
    _train(model3, opt3, data[3:])
    for key, value in _weights(model3).items():
        assert torch.equal(value, _weights(model)[key]), key


def test_warmup_first_step_at_lr_zero_is_real():
    """A first step at lr 0 with real gradients (a warm-up schedule) refreshes its projectors as always."""
    model, opt = _setup("galore_adamw", torch.float32)
    for group in opt.param_groups:
        group["lr"] = 0.0
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with mock.patch.object(SVDProjector, "refresh", autospec=True, side_effect=SVDProjector.refresh) as refresh:
        opt.step()
    assert refresh.call_count > 0 and not opt.stand_in
    assert all(st["step"] == 1 for st in opt.state.values())
