"""L4Q's linear (``leantune.kernels.l4q``) against independent references: float64 autograd through LSQ's
gradient-scale and straight-through tricks, and the step / zero-point gradients of one group written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from leantune.kernels import l4q
from leantune.kernels.l4q import l4q_linear, lsq_gradient_scale, qrange, reference_l4q_linear


def _case(o=6, i=8, r=2, g=4, batch=(2, 3), dtype=torch.float64, seed=0, qp=7):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(o, i, generator=gen, dtype=dtype)
    a = (torch.randn(r, i, generator=gen, dtype=dtype) * 0.3).requires_grad_()
    b = (torch.randn(o, r, generator=gen, dtype=dtype) * 0.3).requires_grad_()
    # a step small enough that some entries clip (|W'| ≳ 1.6 of a unit normal), on both sides: both branches of every
    # gradient are exercised
    scale = ((torch.rand(o, i // g, generator=gen, dtype=dtype) * 0.2 + 1.0) * 1.6 / qp).requires_grad_()
    zero = (torch.randn(o, i // g, generator=gen, dtype=dtype) * 0.1 * qp).requires_grad_()
    x = torch.randn(*batch, i, generator=gen, dtype=dtype).requires_grad_()
    return x, w0, a, b, scale, zero


def _grads(fn, tensors, seed=1):
    out = fn()
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out, torch.autograd.grad(out, tensors, upstream)


@pytest.mark.parametrize("batch", [(1, 1), (1, 5), (2, 3), (7,)], ids=["b1", "b1x5", "b2x3", "b7"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("chunk", [None, 16], ids=["one-chunk", "rows-in-3-chunks"])
def test_backward_equals_float64_autograd(batch, bits, chunk, monkeypatch):
    """Every gradient (x, A, B, s, z) equals autograd of the reference fake-quant at batch 1, 2 and 7 (the only L4Q
    code found uses the first batch row only, spec §1.7), also when the quantizer runs a few rows at a time."""
    if chunk is not None:
        monkeypatch.setattr(l4q, "CHUNK_NUMEL", chunk)
    x, w0, a, b, scale, zero = _case(batch=batch, qp=qrange(bits)[1])
    alpha, gamma = 2.0, lsq_gradient_scale(4, bits)
    tensors = (x, a, b, scale, zero)
    ours, g_ours = _grads(lambda: l4q_linear(x, w0, a, b, scale, zero, alpha, bits, gamma), tensors)
    ref, g_ref = _grads(lambda: reference_l4q_linear(x, w0, a, b, scale, zero, alpha, bits, gamma), tensors)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for name, mine, theirs in zip("x A B s z".split(), g_ours, g_ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")
    # the case must exercise both branches: some entries clip, most do not
    v = ((w0 + alpha * b @ a).view(6, 2, 4) / scale[..., None] + zero[..., None]).detach()
    qn, qp = qrange(bits)
    inside = (v >= qn) & (v <= qp)
    assert 0 < int(inside.sum()) < inside.numel()


def test_step_and_zero_gradient_by_hand():
    """∂L/∂s and ∂L/∂z of one group from the LSQ+ STE formulas, evaluated number by number in float64."""
    x, w0, a, b, scale, zero = _case(o=1, i=4, r=1, g=4, batch=(3,), qp=3)
    w0[0, 1] = 9.0  # certainly clipped at 3 bits
    alpha, bits = 1.5, 3
    qn, qp = qrange(bits)
    gamma = 1 / math.sqrt(4 * qp)
    upstream = torch.randn(3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = l4q_linear(x, w0, a, b, scale, zero, alpha, bits)  # γ defaults to LSQ's 1/√(g·Q_p)
    ds, dz = torch.autograd.grad(out, (scale, zero), upstream)
    w_prime = (w0 + alpha * b @ a).detach()[0]
    s, z = float(scale[0, 0].detach()), float(zero[0, 0].detach())
    want_s = want_z = 0.0
    clipped = 0
    for j in range(4):
        g_j = float(sum(upstream[t, 0] * x[t, j].detach() for t in range(3)))  # G = Σ_t g_y x
        v = float(w_prime[j]) / s + z
        if qn <= v <= qp:
            want_s += g_j * (round(v) - v)
        else:
            clipped += 1
            q = qn if v < qn else qp
            want_s += g_j * (q - z)
            want_z += g_j * (-s)
    assert clipped > 0
    assert ds.item() == pytest.approx(gamma * want_s, rel=1e-12, abs=1e-14)
    assert dz.item() == pytest.approx(gamma * want_z, rel=1e-12, abs=1e-14)


def test_saves_no_weight_sized_tensor_but_w0():
    """What lives from forward to backward: x, W0 (the frozen parameter itself), A, B, s, z — never Ŵ or W'."""
    x, w0, a, b, scale, zero = _case(o=16, i=32, r=2, g=8, batch=(2, 5), dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = l4q_linear(x, w0, a, b, scale, zero, 2.0, 4)
    weight_sized = [t for t in saved if t.shape == w0.shape]
    assert len(weight_sized) == 1 and weight_sized[0].data_ptr() == w0.data_ptr()
    assert sum(t.numel() for t in saved) == x.numel() + w0.numel() + a.numel() + b.numel() + 2 * scale.numel()
    out.sum().backward()


def test_bf16_forward_is_the_served_weight():
    """In bf16 the forward multiplies by ``(q − z)·s`` computed in bf16 (what the export dequantizes), and the
    gradients stay within bf16 rounding of the float64 oracle."""
    x, w0, a, b, scale, zero = _case(o=8, i=16, r=2, g=8, batch=(4,), dtype=torch.float64)
    w0_bf = w0.to(torch.bfloat16)
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    s32, z32 = scale.detach().float().requires_grad_(), zero.detach().float().requires_grad_()
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    out = l4q_linear(xb, w0_bf, a32, b32, s32, z32, 2.0, 4)
    assert out.dtype == torch.bfloat16
    w_prime = (w0_bf.float() + 2.0 * b32 @ a32).view(8, 2, 8)
    q = torch.clamp(torch.round(w_prime / s32[..., None] + z32[..., None]), -8, 7)
    bf = torch.bfloat16
    w_hat = ((q.to(bf) - z32.to(bf)[..., None]) * s32.to(bf)[..., None]).reshape(8, 16)
    torch.testing.assert_close(out, torch.nn.functional.linear(xb.detach(), w_hat), rtol=0, atol=0)
    out.float().sum().backward()
    ref = reference_l4q_linear(x.detach(), w0_bf.double(), a.detach().requires_grad_(), b.detach().requires_grad_(),
                               scale.detach().requires_grad_(), zero.detach().requires_grad_(), 2.0, 4,
                               lsq_gradient_scale(8, 4))
    ref.sum().backward()
    assert torch.allclose(xb.grad.double(), torch.ones(4, 8, dtype=torch.float64) @ w_hat.double(), atol=0.05)
    assert a32.grad.dtype == torch.float32 and torch.isfinite(a32.grad).all()


def test_bad_shapes_are_refused():
    x, w0, a, b, scale, zero = _case()
    with pytest.raises(ValueError, match="step and zero point"):
        l4q_linear(x, w0, a, b, scale[:, :1].repeat(1, 3), zero[:, :1].repeat(1, 3), 1.0, 4)


def test_adapter_gradients_match_finite_differences():
    """Spec §7.4: the straight-through chain rule dA = α Bᵀ(M⊙G), dB = α (M⊙G) Aᵀ (M: not clipped), checked without
    autograd by central differences of the surrogate the STE differentiates — the quantizer with its rounding
    taken out, ``(clamp(W'/s + z, Q_n, Q_p) − z)·s`` — in float64, for every entry of A and B whose ±h moves no
    element across a clipping boundary (the surrogate is smooth there)."""
    x, w0, a, b, scale, zero = _case(batch=(5,), qp=7)
    alpha, bits, h = 2.0, 4, 1e-6
    qn, qp = qrange(bits)
    upstream = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = l4q_linear(x, w0, a, b, scale, zero, alpha, bits)
    grad_a, grad_b = torch.autograd.grad(out, (a, b), upstream)

    def surrogate(a_, b_):
        v = (w0 + alpha * b_ @ a_).view(6, 2, 4) / scale[..., None] + zero[..., None]
        w_soft = ((v.clamp(qn, qp) - zero[..., None]) * scale[..., None]).reshape(6, 8)
        return float((x @ w_soft.T * upstream).sum()), ((v >= qn) & (v <= qp))

    with torch.no_grad():
        checked = 0
        for tensor, grad in ((a, grad_a), (b, grad_b)):
            for index in range(tensor.numel()):
                plus, minus = tensor.detach().clone(), tensor.detach().clone()
                plus.view(-1)[index] += h
                minus.view(-1)[index] -= h
                args = lambda t: (t, b.detach()) if tensor is a else (a.detach(), t)  # noqa: E731
                (f_plus, m_plus), (f_minus, m_minus) = surrogate(*args(plus)), surrogate(*args(minus))
                if not torch.equal(m_plus, m_minus):
                    continue
                checked += 1
                assert abs((f_plus - f_minus) / (2 * h) - float(grad.view(-1)[index])) < 1e-6
    assert checked >= 0.8 * (a.numel() + b.numel())
