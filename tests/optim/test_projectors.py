"""DCT basis / selection properties, randomized SVD subspace, Woodbury vs dense solve, param-group selection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantune.optim import (
    DCTProjector,
    GaLoreAdamW,
    NaturalGaLoreAdamW,
    RandomizedSVDProjector,
    SVDProjector,
    dct_matrix,
    make_param_groups,
    optimizer_state_bytes,
    shared_dct_basis,
    woodbury_inverse_fisher,
)
from tests.optim.helpers import batches, make_net, train


@pytest.mark.parametrize("d", [7, 16, 33])
def test_dct_basis_orthonormal_and_is_dct2(d):
    Q = dct_matrix(d, dtype=torch.float64)
    torch.testing.assert_close(Q.t() @ Q, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    # column k is the k-th DCT-II basis vector, evaluated by hand
    k, j = 3, 5
    expected = math.sqrt(2 / d) * math.cos(math.pi * k * (2 * j + 1) / (2 * d))
    assert abs(Q[j, k].item() - expected) < 1e-12
    assert torch.allclose(Q[:, 0], torch.full((d,), 1 / math.sqrt(d), dtype=torch.float64))


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)], ids=["tall-right", "wide-left"])
@pytest.mark.parametrize("norm_ord", [1, 2])
def test_dct_selects_top_r_columns_and_stores_only_int32(shape, norm_ord):
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float64)
    state: dict = {}
    proj = DCTProjector(state, rank=5, update_proj_gap=1, scale=1.0, norm_ord=norm_ord)
    assert proj.refresh(G, 0)
    d = min(shape)
    Q = dct_matrix(d, dtype=torch.float64)
    coeffs = G @ Q if shape[0] >= shape[1] else (Q.t() @ G).t()  # one column of coefficients per basis vector
    score = torch.linalg.vector_norm(coeffs, ord=norm_ord, dim=0)
    assert set(state["proj_indices"].tolist()) == set(torch.argsort(score, descending=True)[:5].tolist())
    assert state["proj_indices"].dtype == torch.int32
    assert [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() > 0] == ["proj_indices"]
    R = proj.project(G)
    assert R.shape == ((shape[0], 5) if shape[0] >= shape[1] else (5, shape[1]))
    # back(project(G)) is the orthogonal projection onto the selected columns
    B = proj.project_back(R)
    torch.testing.assert_close(proj.project(B), R)


def test_dct_basis_shared_across_layers():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16))
    opt = GaLoreAdamW(make_param_groups(model, rank=4, projector="dct", scale=1.0), lr=1e-3)
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    bases = opt.shared_state_tensors()
    assert len(bases) == 3 and all(b is bases[0] for b in bases)  # one 16 x 16 basis for all three layers
    assert bases[0] is shared_dct_basis(16, torch.float32, torch.device("cpu"))


def test_rsvd_recovers_exact_subspace_of_low_rank_gradient():
    torch.manual_seed(0)
    G = torch.randn(60, 6) @ torch.randn(6, 25)  # exact rank 6
    exact, rand = SVDProjector({}, 6, 10, 1.0), RandomizedSVDProjector({}, 6, 10, 1.0, seed=3)
    exact.refresh(G, 0)
    rand.refresh(G, 0)
    Pe, Pr = exact.matrix().double(), rand.matrix().double()  # right side: 6 x 25
    torch.testing.assert_close(Pe.t() @ Pe, Pr.t() @ Pr, atol=1e-4, rtol=0)
    torch.testing.assert_close(rand.project_back(rand.project(G)), G, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64)], ids=["right", "left"])
def test_svd_projector_stores_compact_copy_not_factor_view(shape, dtype):
    G = torch.randn(shape).to(dtype)
    state: dict = {}
    SVDProjector(state, 4, 10, 1.0).refresh(G, 0)
    assert state["proj_ortho"].untyped_storage().nbytes() == 4 * 48 * G.element_size()


@pytest.mark.parametrize("s", [1, 3, 5])
def test_woodbury_equals_dense_solve(s):
    torch.manual_seed(s)
    d, lam = 20, 1e-2
    H = torch.randn(s, d, dtype=torch.float64)
    g = torch.randn(d, dtype=torch.float64)
    dense = torch.linalg.solve(lam * torch.eye(d, dtype=torch.float64) + H.t() @ H, g)
    torch.testing.assert_close(woodbury_inverse_fisher(g, H, lam), dense, rtol=1e-9, atol=1e-9)


def test_natural_galore_history_is_bounded():
    model = make_net()
    opt = NaturalGaLoreAdamW(make_param_groups(model, target_modules=["mid"], rank=4, update_proj_gap=3),
                             lr=1e-3, history_size=2)
    train(model, opt, batches(5))
    st = opt.state[model.mid.weight]
    assert st["fisher_history"].shape == (2, 40 * 4) and st["fisher_count"] == 5
    # history = s * r * max(m, n) floats, on top of GaLore's projector + 2 moments
    assert optimizer_state_bytes(opt) > 0


def test_target_modules_selection_and_errors():
    model = make_net()
    names = lambda groups: sorted(n for g in groups if "rank" in g for n, _ in g["params"])  # noqa: E731
    assert names(make_param_groups(model, target_modules="all-linear")) == ["down.weight", "mid.weight", "up.weight"]
    assert names(make_param_groups(model, target_modules=["mid"])) == ["mid.weight"]
    assert names(make_param_groups(model, target_modules=r"(up|down)")) == ["down.weight", "up.weight"]
    groups = make_param_groups(model, target_modules=["mid"], weight_decay=0.1)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0][0]["params"]
    assert any(p is model.norm.weight for _, p in no_decay) and any(p is model.up.bias for _, p in no_decay)
    with pytest.raises(ValueError, match="matched no trainable 2-D linear weight.*up"):
        make_param_groups(model, target_modules=["q_proj"])


def test_woodbury_survives_nearly_equal_history_rows():
    """Equal gradients with a large norm and λ = 1e-3 make I + H Hᵀ/λ ill-conditioned beyond fp32 (Cholesky and solve
    failed there, raising mid-training); the s x s system is solved in float64 and matches the direct formula."""
    torch.manual_seed(0)
    g = torch.randn(50_000) * 3
    history = g.repeat(4, 1)
    out = woodbury_inverse_fisher(g, history, 1e-3)
    direct = torch.linalg.solve(1e-3 * torch.eye(4, dtype=torch.float64) + history.double() @ history.double().T,
                                history.double() @ g.double())  # (λI + H Hᵀ)⁻¹ H g, then F⁻¹ g = (g − Hᵀ ·)/λ
    expected = (g.double() - history.double().T @ direct) / 1e-3
    assert torch.isfinite(out).all()
    # g lies in the span of H, so F⁻¹g is g/λ minus a nearly equal term: fp32 keeps it to ~1e-7 of the terms' size
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6 * g.abs().max().item() / 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.25, 2.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48)], ids=["right", "left"])
def test_project_back_equals_the_references_rounding(shape, scale, dtype):
    """back(R) = (P R or R P) · α bit for bit, also where α = 2^k is folded into the low-rank factor (cheaper)."""
    torch.manual_seed(0)
    G = torch.randn(shape).to(dtype)
    proj = SVDProjector({}, 5, 10, scale)
    proj.refresh(G, 0)
    R = proj.project(G) * 1e-3  # an update-sized low-rank tensor
    P = proj.matrix()
    product = R @ P if proj.state["proj_right"] else P @ R
    assert torch.equal(proj.project_back(R), product * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row-major", "transposed-view"])
@pytest.mark.parametrize("dim", [0, 1])
def test_channel_norms_equal_torchs_vector_norm(dim, layout, dtype):
    """The fast column norm (sum of squares on CPU) is torch's vector norm up to the rounding of the sum."""
    from leantune._utils import channel_norms

    torch.manual_seed(0)
    x = torch.randn(37, 53, dtype=torch.float64) * torch.logspace(-3, 3, 53, dtype=torch.float64)
    x = (x if layout == "row-major" else x.t().contiguous().t()).to(dtype)
    exact = torch.linalg.vector_norm(x.double(), dim=dim)
    got = channel_norms(x, dim)
    assert got.dtype == dtype and got.shape == exact.shape
    rel = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.double(), exact, rtol=rel, atol=0)
    assert torch.equal(channel_norms(x, dim, exact=True), torch.linalg.vector_norm(x, dim=dim))  # reference paths
    if dtype != torch.float64:  # (torch refuses a narrowing dtype)
        assert channel_norms(x, dim, torch.float32).dtype == torch.float32
