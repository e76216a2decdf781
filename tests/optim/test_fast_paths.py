"""The default (torch-style) update paths fuse ops (one GEMM into W, one pass for APOLLO's scaled gradient); each is
checked here against its formula written out op by op in float64 (the reference_adam paths are checked bitwise
against the reference packages in test_exactness / test_apollo)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantune.optim import APOLLOAdamW, FiraAdamW, GaLoreAdamW
from leantune.optim.projectors import RandomProjector

B1, B2, EPS, LR, WD = 0.9, 0.99, 1e-8, 1e-2, 0.1


def _torch_adam(st, R, t):
    st["m"] = B1 * st["m"] + (1 - B1) * R
    st["v"] = B2 * st["v"] + (1 - B2) * R * R
    return (st["m"] / (1 - B1**t)) / ((st["v"] / (1 - B2**t)).sqrt() + EPS)


def _limit(S, st):
    norm = S.norm()
    if "prev" not in st:
        st["prev"] = norm
        return S
    lam = max(float(norm / (st["prev"] + 1e-8)), 1.01) / 1.01
    st["prev"] = norm / lam
    return S / lam


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)], ids=["tall", "wide"])
@pytest.mark.parametrize("method", ["galore", "fira", "apollo-channel", "apollo-tensor-front"])
def test_default_path_matches_formula(method, shape):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(5)]
    rank, scale = 4, 0.25
    group = {"params": [w], "rank": rank, "update_proj_gap": 1000, "scale": scale}
    if method.startswith("apollo"):
        front = method.endswith("front")
        opt = APOLLOAdamW([{**group, "scale": 4.0, "scale_type": method.split("-")[1], "scale_front": front}],
                          lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    else:
        opt = (FiraAdamW if method == "fira" else GaLoreAdamW)([group], lr=LR, betas=(B1, B2), eps=EPS,
                                                             weight_decay=WD)
    W = w.detach().clone()
    st = {}
    for t, G in enumerate(grads, start=1):
        w.grad = G.clone()
        opt.step()
        state = opt.state[w]
        tall = shape[0] >= shape[1]
        if method.startswith("apollo"):
            P = RandomProjector(state, rank, 1000, 4.0).matrix()
        else:
            P = state["proj_ortho"]
        R = G @ P.T if tall else P.T @ G
        st.setdefault("m", torch.zeros_like(R))
        st.setdefault("v", torch.zeros_like(R))
        N = _torch_adam(st, R, t)
        back = (lambda X: X @ P) if tall else (lambda X: P @ X)
        W = W * (1 - LR * WD)
        if method.startswith("apollo"):
            dim = 1 if tall else 0
            s = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + 1e-8)
            if method.endswith("tensor-front"):
                s = N.norm() / (R.norm() + 1e-8)
            S = G * s
            S = _limit(S * 2.0, st) if front else _limit(S, st) * 2.0  # √scale = 2
            W = W - LR * S
        else:
            update = scale * back(N)
            if method == "fira":
                dim = 0 if N.shape[0] < N.shape[1] else 1
                phi = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + 1e-8)
                update = update + _limit((G - scale * back(R)) * phi, st)
            W = W - LR * update
        torch.testing.assert_close(w.detach(), W, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {t}: {m}")
    assert not torch.allclose(W, grads[0])
