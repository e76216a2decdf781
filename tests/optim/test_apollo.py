"""APOLLO / APOLLO-Mini: bitwise parity with apollo-torch 1.0.3 (fp32, reference arithmetic), the paper's closed form
for the first step in float64, apollo-torch's group keys, and a state that holds no projection matrix."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from leantune.optim import APOLLOAdamW, APOLLOMini, optimizer_state_bytes
from leantune.optim.projectors import RandomProjector, next_seed
from tests.optim.helpers import assert_lockstep, batches, galore_groups, loss_fn, make_net, params_equal

STEPS = 16  # update_proj_gap 5: projections drawn at steps 1, 6, 11, 16


def _apollo_keys(rank: int, scale_type: str, scale: float, proj: str = "random") -> dict:
    return dict(rank=rank, proj=proj, scale_type=scale_type, scale=scale, update_proj_gap=5, proj_type="std")


@pytest.mark.parametrize("case", [
    dict(rank=4, scale_type="channel", scale=1.0),
    dict(rank=4, scale_type="channel", scale=2.0, weight_decay=0.1, scale_front=True),
    dict(rank=1, scale_type="tensor", scale=128.0),  # APOLLO-Mini
    dict(rank=1, scale_type="tensor", scale=128.0, scale_front=True, disable_nl=True),
    dict(rank=3, scale_type="channel", scale=1.0, proj="svd"),  # "APOLLO w/ SVD"
], ids=["apollo", "apollo-wd-front", "mini", "mini-front-nolimiter", "apollo-svd"])
def test_matches_apollo_torch_bitwise(case):
    apollo_torch = pytest.importorskip("apollo_torch")
    case = dict(case)
    wd = case.pop("weight_decay", 0.0)
    flags = {k: case.pop(k) for k in ("scale_front", "disable_nl") if k in case}
    keys = _apollo_keys(**case)
    data = batches(STEPS)
    ref_model, our_model = make_net(), make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = apollo_torch.APOLLOAdamW(galore_groups(ref_model, **keys), lr=3e-3, weight_decay=wd, **flags)
    ours = APOLLOAdamW(galore_groups(our_model, **keys), lr=3e-3, weight_decay=wd, reference_adam=True, **flags)
    assert_lockstep(ref_model, ref, our_model, ours, data)
    assert not params_equal(our_model, make_net())
    if keys["proj"] == "random":  # the same projection sequence, though ours keeps only its seed
        for p_ref, p_our in zip(ref.param_groups[1]["params"], ours.param_groups[1]["params"]):
            st_ref, st_our = ref.state[p_ref], ours.state[p_our]
            assert "proj_ortho" not in st_our
            projector = RandomProjector(st_our, keys["rank"], 5, keys["scale"])
            assert torch.equal(st_ref["projector"].ortho_matrix, projector.matrix())
            if "scaled_grad" in st_ref:
                assert torch.equal(st_ref["scaled_grad"], st_our["limiter_norm"])


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)], ids=["tall", "wide"])
@pytest.mark.parametrize("scale_type,rank", [("channel", 1), ("channel", 3), ("tensor", 1), ("tensor", 2)])
def test_first_step_closed_form(shape, scale_type, rank):
    """The paper's rule (APOLLO, arXiv 2412.05270) with ε → 0: channel Δ = −η √scale √r G_c / ‖R_c‖ per channel; tensor
    Δ = −η √scale √numel(R) / ‖R‖_F · G (evaluated by hand in float64; the +1e-8 of the norm ratio kept)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    G = torch.randn(*shape, dtype=torch.float64)
    lr, scale = 0.1, 4.0
    opt = APOLLOAdamW([{"params": [w], "rank": rank, "update_proj_gap": 5, "scale_type": scale_type, "scale": scale}],
                      lr=lr, eps=1e-30, reference_adam=True)
    before = w.detach().clone()
    w.grad = G.clone()
    opt.step()
    P = RandomProjector(opt.state[w], rank, 5, scale).matrix()
    tall = shape[0] >= shape[1]
    R = G @ P.t() if tall else P.t() @ G
    if scale_type == "channel":
        norms = R.norm(dim=1, keepdim=True) if tall else R.norm(dim=0, keepdim=True)
        expected = -lr * math.sqrt(scale) * math.sqrt(rank) * G / (norms + 1e-8)
    else:
        expected = -lr * math.sqrt(scale) * math.sqrt(R.numel()) / (R.norm() + 1e-8) * G
    torch.testing.assert_close(w.detach() - before, expected, rtol=1e-9, atol=1e-12)


def test_seed_sequence_and_regeneration():
    """Seeds are 1-based positions over all parameters of all groups; each refresh draws next_seed of the last."""
    model = make_net()
    opt = APOLLOMini(galore_groups(model, rank=1, update_proj_gap=2), lr=1e-3)
    n_rest = len(opt.param_groups[0]["params"])
    for xy in batches(3):
        loss_fn(model, xy).backward()
        opt.step()
        opt.zero_grad()
    first = opt.state[model.up.weight]
    assert first["proj_seed"] == next_seed(n_rest + 1)  # drawn at steps 1 and 3
    gen = torch.Generator().manual_seed(first["proj_seed"])
    expected = torch.randn(1, 12, generator=gen)  # up.weight is 40 x 12: right side, P is r x n
    assert torch.equal(RandomProjector(first, 1, 2, 128.0).matrix(), expected)


def test_mini_state_is_tiny():
    """APOLLO-Mini keeps M, V (2 max(m, n)), the limiter norm and an int seed per matrix; no r x min(m, n) P."""
    w = torch.nn.Parameter(torch.randn(256, 96))
    opt = APOLLOMini([{"params": [w], "rank": 1}], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    state_bytes = optimizer_state_bytes(opt)
    assert state_bytes == 4 * (2 * 256 + 1)  # exp_avg, exp_avg_sq (256 x 1 each) + limiter norm
    assert state_bytes <= 0.03 * 2 * 4 * w.numel()  # ≤ 3% of AdamW's two full moments


def test_group_keys_and_bad_input():
    model = make_net()
    with pytest.raises(ValueError, match="scale_type"):
        APOLLOAdamW(galore_groups(model, rank=2, scale_type="row"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['scal'\]"):
        APOLLOAdamW(galore_groups(model, rank=2, scal=2.0))
    with pytest.raises(ValueError, match="rank=7 exceeds the smaller side"):
        APOLLOAdamW(galore_groups(model, rank=7))  # down.weight is 6 x 40
    with pytest.raises(ValueError, match="proj=.*projector=|same setting"):
        APOLLOAdamW(galore_groups(model, rank=2, proj="svd", projector="random"))
