"""Fused low-rank Adam step: Triton (interpreter) vs reference; reference vs galore-torch and torch.optim.AdamW."""

import pytest
import torch

from leantune.kernels import optimizer_step as ops

from .conftest import assert_close


def _states(shape):
    return torch.zeros(shape), torch.zeros(shape)


@pytest.mark.parametrize(
    "side,shape,rank,variant",
    [
        ("right", (45, 23), 5, "galore"),
        ("left", (23, 45), 5, "galore"),
        ("left", (1, 37), 1, "galore"),  # single row
        ("right", (70, 40), 40, "fira"),  # full rank, with a Fira residual
        ("right", (33, 17), 6, "dct"),  # transposed (non-contiguous) projector view, torch eps, decay before
    ],
)
def test_triton_step_matches_reference(side, shape, rank, variant):
    m, n = shape
    low = (m, rank) if side == "right" else (rank, n)
    if variant == "dct":
        proj = torch.linalg.qr(torch.randn(n, n))[0].contiguous()[:, torch.randperm(n)[:rank]].t()  # Q[:, idx]ᵀ
        assert not proj.is_contiguous()
    else:
        proj = torch.randn(rank, n) if side == "right" else torch.randn(m, rank)
    kw = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.1, scale=0.25 if variant != "dct" else 1.0, side=side)
    if variant == "dct":
        kw.update(eps_mode="torch", weight_decay_mode="before")
    p0 = torch.randn(m, n)
    runs = []
    for step_fn in (ops.reference_galore_adam_step, ops.triton_galore_adam_step):
        torch.manual_seed(1)
        p, (ma, va) = p0.clone(), _states(low)
        for t in range(1, 4):
            res = torch.randn(m, n) * 0.1 if variant == "fira" else None
            step_fn(p, torch.randn(m, n), proj, ma, va, step=t, residual=res, **kw)
        runs.append((p, ma, va))
    (p_ref, m_ref, v_ref), (p_tri, m_tri, v_tri) = runs
    assert not torch.equal(p_ref, p0)
    assert_close(p_tri, p_ref, factor=5.0)
    assert_close(m_tri, m_ref, factor=5.0)
    assert_close(v_tri, v_ref, factor=5.0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall-right", "wide-left"])
def test_reference_matches_galore_torch(shape):
    from galore_torch import GaLoreAdamW

    p = torch.nn.Parameter(torch.randn(shape))
    p_ours = p.detach().clone()
    grads = [torch.randn(shape) for _ in range(4)]
    opt = GaLoreAdamW(
        [{"params": [p], "rank": 6, "update_proj_gap": 1000, "scale": 0.25, "proj_type": "std"}],
        lr=1e-2, weight_decay=0.05,
    )  # fmt: skip
    for g in grads:
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    proj = state["projector"].ortho_matrix  # computed at step 0 and kept (T = 1000)
    side = "right" if shape[0] >= shape[1] else "left"
    m, v = torch.zeros_like(state["exp_avg"]), torch.zeros_like(state["exp_avg_sq"])
    for t, g in enumerate(grads, start=1):
        ops.reference_galore_adam_step(
            p_ours, g, proj, m, v, step=t, lr=1e-2, eps=1e-6, weight_decay=0.05, scale=0.25, side=side
        )
    assert torch.allclose(m, state["exp_avg"], rtol=1e-6, atol=1e-7)
    assert torch.allclose(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert torch.allclose(p_ours, p.detach(), rtol=1e-6, atol=1e-6)


def test_torch_eps_mode_full_basis_equals_adamw_in_rotated_coordinates():
    """DCT-AdamW with r = d and an orthonormal basis Q is torch AdamW on W Q (a full orthonormal basis rotates Adam's coordinates)."""
    m_, n = 12, 8
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    w0 = torch.randn(m_, n, dtype=torch.float64)
    grads = [torch.randn(m_, n, dtype=torch.float64) for _ in range(3)]
    rotated = torch.nn.Parameter(w0 @ q)
    adamw = torch.optim.AdamW([rotated], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for g in grads:
        rotated.grad = g @ q
        adamw.step()
    w, ma, va = w0.clone(), torch.zeros(m_, n, dtype=torch.float64), torch.zeros(m_, n, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        ops.reference_galore_adam_step(
            w, g, q.t(), ma, va, step=t, lr=1e-2, eps=1e-8, weight_decay=0.1, side="right",
            eps_mode="torch", weight_decay_mode="before",
        )  # fmt: skip
    assert torch.allclose(w, rotated.detach() @ q.t(), atol=1e-12)


def test_dispatch_and_errors():
    p = torch.randn(6, 4)
    with pytest.raises(ValueError, match="1-based"):
        ops.fused_galore_adam_step(p, p.clone(), torch.randn(2, 4), *_states((6, 2)), step=0, lr=1.0)
    with pytest.raises(ValueError, match="side"):
        ops.fused_galore_adam_step(p, p.clone(), torch.randn(2, 4), *_states((6, 2)), step=1, lr=1.0, side="up")
    with pytest.raises(ValueError, match="2-D"):
        ops.fused_galore_adam_step(p[0], p[0], torch.randn(2, 4), *_states((6, 2)), step=1, lr=1.0)


# ---- the optimizers call the fused step (Triton in the interpreter here, as on CUDA) and match their torch path


def _run_optimizer(cls, fused: bool, steps: int = 4, force_path: str | None = None, **kwargs):
    from leantune.kernels import dispatch, force_triton

    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(40, 24))  # m >= n: right projection
    wide = torch.nn.Parameter(torch.randn(20, 36))  # m < n: left projection
    bias = torch.nn.Parameter(torch.randn(24))
    groups = [{"params": [tall, wide], "rank": 4, "update_proj_gap": 2, "scale": 0.5}, {"params": [bias]}]
    opt = cls(groups, lr=1e-2, weight_decay=0.1, **kwargs)
    opt.force_path = force_path
    calls = []
    original = dispatch._KERNELS["galore_adam_step"]

    def counting(*args, **kw):
        calls.append(kw["side"])
        return original(*args, **kw)

    dispatch._KERNELS["galore_adam_step"] = counting
    try:
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            for p in (tall, wide, bias):
                p.grad = torch.randn(p.shape, generator=g)
            if fused:
                with force_triton():
                    opt.step()
            else:
                opt.step()
    finally:
        dispatch._KERNELS["galore_adam_step"] = original
    return [t.detach().clone() for t in (tall, wide, bias)], calls


@pytest.mark.parametrize(
    "cls_name,kwargs",
    [
        ("GaLoreAdamW", {"reference_adam": True}),
        ("GaLoreAdamW", {"reference_adam": False}),
        ("GaLoreAdamW", {"projector": "dct"}),
        ("FiraAdamW", {"reference_adam": True}),
        ("FiraAdamW", {"reference_adam": False}),
    ],
)
def test_low_rank_optimizers_route_through_fused_step(cls_name, kwargs):
    import leantune.optim as lo

    cls = getattr(lo, cls_name)
    eager, eager_calls = _run_optimizer(cls, fused=False, **kwargs)
    fused, fused_calls = _run_optimizer(cls, fused=True, **kwargs)
    assert eager_calls == []  # CPU tensors: the torch path, no kernel
    assert sorted(set(fused_calls)) == ["left", "right"] and len(fused_calls) == 2 * 4  # both matrices, every step
    for a, b in zip(fused, eager):
        assert_close(a, b, torch.float32, factor=5)


def test_natural_galore_keeps_its_torch_path():
    """Natural GaLore preconditions R before Adam; the fused kernel cannot, so it must not be used."""
    import leantune.optim as lo

    _, calls = _run_optimizer(lo.NaturalGaLoreAdamW, fused=True, steps=2)
    assert calls == []


@pytest.mark.parametrize("cls_name,kwargs", [("GaLoreAdamW", {}), ("GaLoreAdamW", {"reference_adam": True}),
                                             ("FiraAdamW", {}), ("GaLoreAdamW", {"projector": "dct"})])
def test_fused_path_equals_the_readable_rule(cls_name, kwargs):
    """The kernel twin against the optimizer's readable rule (its docstring's formula as written), fp32: to rounding
    (the kernel computes in fp32 with another operation order)."""
    import leantune.optim as lo

    cls = getattr(lo, cls_name)
    fused, calls = _run_optimizer(cls, fused=True, **kwargs)
    readable, readable_calls = _run_optimizer(cls, fused=True, force_path="readable", **kwargs)
    assert len(calls) == 8 and readable_calls == []
    for a, b in zip(fused, readable):
        assert_close(a, b, torch.float32, factor=5)
