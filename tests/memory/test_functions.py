"""Each custom autograd function against its definition (fp64 gradcheck / hand formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

import leantune.kernels as lk
from leantune.kernels.activations import REGELU2_CONSTANTS, RESILU2_CONSTANTS, step_codes
from leantune.kernels.fused_mlp import GatedMLPFunction, GatedMLPSpec

REGELU2_SLOPES, REGELU2_THRESHOLDS = REGELU2_CONSTANTS
RESILU2_SLOPES, RESILU2_THRESHOLDS = RESILU2_CONSTANTS


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def surrogate(x, slopes, thresholds):
    """h̃(x) = Σ a_i ReLU(x − c_i) in float64; autograd gives its step derivative (ReLU'(0) = 0: strict >)."""
    return sum(a * torch.relu(x - c) for a, c in zip(slopes, thresholds))


def test_pack_unpack_roundtrip_and_layout():
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    packed = lk.pack_2bit(codes)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4, 3]  # element i at bits 2·(i mod 4)
    random = torch.randint(0, 4, (1001,), dtype=torch.uint8)
    assert torch.equal(lk.unpack_2bit(lk.pack_2bit(random), 1001), random)


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "silu"])
def test_approx_activation_backward_is_the_step_derivative(kind):
    slopes, thresholds = (RESILU2_SLOPES, RESILU2_THRESHOLDS) if kind == "silu" else (REGELU2_SLOPES,
                                                                                      REGELU2_THRESHOLDS)
    points = [torch.randn(2000, dtype=torch.float64) * 5]
    for c in thresholds:  # exactly at, and one ulp around, every threshold
        c = torch.tensor(c, dtype=torch.float64)
        points.append(torch.stack([c, torch.nextafter(c, c - 1), torch.nextafter(c, c + 1), c - 1e-3, c + 1e-3]))
    x = torch.cat(points).requires_grad_(True)
    if kind == "silu":
        y = lk.resilu2(x)
        exact = F.silu(x.detach())
    else:
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        y = lk.regelu2(x, approximate)
        exact = F.gelu(x.detach(), approximate=approximate)
    assert torch.equal(y.detach(), exact)  # forward: the exact activation
    grad_out = torch.randn_like(x)
    (grad,) = torch.autograd.grad(y, x, grad_out)
    xs = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(surrogate(xs, slopes, thresholds), xs, grad_out)
    torch.testing.assert_close(grad, expected, atol=1e-15, rtol=1e-12)
    at_threshold = x.detach() == torch.tensor(thresholds[1], dtype=torch.float64)
    assert torch.equal(step_codes(x.detach()[at_threshold], thresholds), torch.tensor([1], dtype=torch.uint8))


def test_approx_activation_keeps_model_forward_and_saves_two_bits():
    x = torch.randn(4, 7, 33, requires_grad=True)  # numel not a multiple of 4
    act = lk.ApproxActivation(NewGELUActivation(), "gelu", None)
    y, saved = _saved(lambda: act(x))
    assert torch.equal(y, NewGELUActivation()(x))
    assert len(saved) == 1 and saved[0].dtype == torch.uint8 and saved[0].numel() == math.ceil(x.numel() / 4)


@pytest.mark.parametrize("fn", [lk.ms_rmsnorm, lk.ms_layernorm])
def test_ms_norm_gradcheck_and_saves_output(fn):
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, 1e-6), (x,))
    reference = (F.layer_norm(x, (12,), eps=1e-6) if fn is lk.ms_layernorm
                 else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    y, saved = _saved(lambda: fn(x, 1e-6))
    torch.testing.assert_close(y, reference)
    assert y.untyped_storage().data_ptr() in {t.untyped_storage().data_ptr() for t in saved}
    others = [t for t in saved if t.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()]
    assert [tuple(t.shape) for t in others] == [(3, 5, 1)]  # only rstd besides the shared output


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("bias", [True, False])
def test_ms_norm_affine_gradcheck_forward_and_saves_output(kind, bias):
    """Post-norm variant: (y, w ⊙ y + b) with y = the MS norm; gradcheck (fp64, the C pass on CPU), forward equal to
    the plain MS norm then addcmul, and only y + rstd saved."""
    from leantune.kernels.norms import ms_norm_affine

    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64) if bias else None

    def both(t):
        y, out = ms_norm_affine(t, 1e-6, kind, w, b)
        return y, out

    assert torch.autograd.gradcheck(both, (x,))
    plain = lk.ms_layernorm(x, 1e-6) if kind == "layernorm" else lk.ms_rmsnorm(x, 1e-6)
    (y, out), saved = _saved(lambda: both(x))
    assert torch.equal(y, plain) and torch.equal(out, plain * w if b is None else torch.addcmul(b, plain, w))
    assert y.untyped_storage().data_ptr() in {t.untyped_storage().data_ptr() for t in saved}
    assert sorted(t.numel() for t in saved) == [15, 180]  # rstd and the shared output only
    with pytest.raises(ValueError, match="frozen"):
        ms_norm_affine(x, 1e-6, kind, w.clone().requires_grad_(), b)


def _projection_tensors(d_in, d_out, rank, bias, dtype=torch.float64):
    w = torch.randn(d_out, d_in, dtype=dtype, requires_grad=True)
    tensors = [w]
    if bias:
        tensors.append(torch.randn(d_out, dtype=dtype, requires_grad=True))
    tensors += [torch.randn(rank, d_in, dtype=dtype, requires_grad=True),
                torch.randn(d_out, rank, dtype=dtype, requires_grad=True)]
    return tensors


@pytest.mark.parametrize("act", [F.silu, lambda t: F.gelu(t, approximate="tanh")])
def test_gated_mlp_gradcheck(act):
    hidden, inter = 6, 10
    x = torch.randn(2, 3, hidden, dtype=torch.float64, requires_grad=True)
    tensors = (_projection_tensors(hidden, inter, 2, True) + _projection_tensors(hidden, inter, 2, False)
               + _projection_tensors(inter, hidden, 2, True))
    spec = GatedMLPSpec(act, None, (True, False, True), ((0.5,), (2.0,), (1.5,)))
    assert torch.autograd.gradcheck(lambda *t: GatedMLPFunction.apply(t[0], spec, *t[1:]), (x, *tensors))

    def eager(x, wg, bg, ag, bgl, wu, au, bul, wd, bd, ad, bdl):
        e = F.linear(x, wg, bg) + F.linear(F.linear(x, ag), bgl) * 0.5
        g = F.linear(x, wu) + F.linear(F.linear(x, au), bul) * 2.0
        h = act(e) * g
        return F.linear(h, wd, bd) + F.linear(F.linear(h, ad), bdl) * 1.5

    torch.testing.assert_close(GatedMLPFunction.apply(x, spec, *tensors), eager(x, *tensors))
    out, saved = _saved(lambda: GatedMLPFunction.apply(x, spec, *tensors))
    activations = [t for t in saved if not any(t is p for p in tensors)]
    assert sorted(t.shape[-1] for t in activations) == [hidden, inter, inter]  # x, e, g only


def test_velora_gradients():
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    v = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    out, saved = _saved(lambda: lk.VeLoRAFunction.apply(x, weight, v, 3, 1.0))
    torch.testing.assert_close(out, x @ weight.t())
    assert [t.shape for t in saved if t is not v and t is not weight] == [torch.Size([2, 5, 3])]
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, weight), grad_out)
    torch.testing.assert_close(gx, grad_out @ weight)  # exact
    sub = x.detach().reshape(2, 5, 3, 4)
    x_hat = ((sub @ v)[..., None] * v).reshape(10, 12)  # projection of each sub-token on v
    torch.testing.assert_close(gw, grad_out.reshape(10, 3).t() @ x_hat)
    # a token made of sub-tokens parallel to v is reconstructed exactly -> exact weight gradient
    x_par = (torch.randn(2, 5, 3, 1, dtype=torch.float64) * v).reshape(2, 5, 12)
    w2 = weight.detach().clone().requires_grad_(True)
    (gw_par,) = torch.autograd.grad(lk.VeLoRAFunction.apply(x_par, w2, v, 3, 1.0), w2, grad_out)
    torch.testing.assert_close(gw_par, grad_out.reshape(10, 3).t() @ x_par.reshape(10, 12))
