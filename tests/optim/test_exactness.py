"""Bitwise parity with the reference PyPI packages galore-torch 1.0 and fira 1.0.2 (fp32, reference settings)."""

from __future__ import annotations

import warnings

import pytest
import torch

from leantune.optim import FiraAdamW, GaLoreAdamW
from tests.optim.helpers import assert_lockstep, batches, galore_groups, loss_fn, make_net, params_equal

STEPS = 24  # with update_proj_gap=5: refreshes at steps 0, 5, 10, 15, 20


def _run_pair(ours_cls, ref_cls, ref_key: str, weight_decay: float, our_extra: dict):
    data = batches(STEPS)
    ref_model, our_model = make_net(), make_net()
    low = dict(rank=4, update_proj_gap=5, proj_type="std")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = ref_cls(galore_groups(ref_model, **low, **{ref_key: 0.25}), lr=3e-3, weight_decay=weight_decay)
    ours = ours_cls(
        galore_groups(our_model, rank=4, update_proj_gap=5, scale=0.25), lr=3e-3, weight_decay=weight_decay,
        reference_adam=True, **our_extra,
    )
    assert_lockstep(ref_model, ref, our_model, ours, data)
    # sanity: the comparison is not vacuous (weights moved, projectors were refreshed)
    assert not params_equal(our_model, make_net())
    return ref, ours


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_adamw_matches_galore_torch_bitwise(weight_decay):
    galore_torch = pytest.importorskip("galore_torch")
    _run_pair(GaLoreAdamW, galore_torch.GaLoreAdamW, "scale", weight_decay, {})


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fira_matches_fira_package_bitwise(weight_decay):
    fira = pytest.importorskip("fira")
    ref, ours = _run_pair(FiraAdamW, fira.FiraAdamW, "alpha", weight_decay, {})
    # the limiter state agrees too
    for p_ref, p_our in zip(ref.param_groups[1]["params"], ours.param_groups[1]["params"]):
        assert torch.equal(ref.state[p_ref]["scaling_grad"], ours.state[p_our]["fira_prev_norm"])


def test_default_mode_differs_from_reference():
    """torch-style eps/bias correction (our default) is a real difference, so the flag matters."""
    a, b = make_net(), make_net()
    oa = GaLoreAdamW(galore_groups(a, rank=4, update_proj_gap=5, scale=0.25), lr=3e-3, reference_adam=True)
    ob = GaLoreAdamW(galore_groups(b, rank=4, update_proj_gap=5, scale=0.25), lr=3e-3)
    for xy in batches(3):
        for m, o in ((a, oa), (b, ob)):
            loss_fn(m, xy).backward()
            o.step()
            o.zero_grad()
    assert not params_equal(a, b)
