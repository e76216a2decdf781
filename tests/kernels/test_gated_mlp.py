"""SwiGLU / GeGLU elementwise kernels: Triton (interpreter) vs reference; reference vs autograd in float64."""

import pytest
import torch

from leantune.kernels import gated_mlp as gm

from .conftest import DTYPES, assert_close

ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
SHAPES = [(1, 1), (3, 43), (2, 4, 173), (1, 2051)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backward_equals_autograd_float64(activation):
    e = (torch.randn(5, 29, dtype=torch.float64) * 4).requires_grad_()
    g = torch.randn(5, 29, dtype=torch.float64, requires_grad=True)
    h = gm._act(e, activation) * g  # autograd through torch's own activation
    dh = torch.randn_like(h)
    de, dg = torch.autograd.grad(h, (e, g), dh)
    h_ref, de_ref, dg_ref = gm.reference_gated_mlp_backward(dh, e.detach(), g.detach(), activation)
    assert torch.allclose(h_ref, h.detach(), atol=1e-12)
    assert torch.allclose(de_ref, de, atol=1e-10) and torch.allclose(dg_ref, dg, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_forward_backward_match_reference(activation, shape, dtype):
    e = (torch.randn(shape) * 3).to(dtype)
    g = torch.randn(shape).to(dtype)
    assert_close(gm.triton_gated_mlp(e, g, activation), gm.reference_gated_mlp(e, g, activation), dtype)
    dh = torch.randn(shape).to(dtype)
    for got, want in zip(gm.triton_gated_mlp_backward(dh, e, g, activation), gm.reference_gated_mlp_backward(dh, e, g, activation)):
        assert_close(got, want, dtype)


def test_autograd_saves_only_inputs_and_matches(triton_on):
    e = torch.randn(6, 40, requires_grad=True)
    g = torch.randn(6, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = gm.gated_activation(e, g, "silu")
    assert {t.data_ptr() for t in saved} == {e.data_ptr(), g.data_ptr()}  # act(e) is recomputed, not stored
    h.sum().backward()
    _, de, dg = gm.reference_gated_mlp_backward(torch.ones_like(h), e.detach(), g.detach(), "silu")
    assert_close(e.grad, de)
    assert_close(g.grad, dg)


def test_bad_activation_and_shapes_raise():
    with pytest.raises(ValueError, match="activation"):
        gm.gated_activation(torch.ones(2), torch.ones(2), "relu")
    with pytest.raises(ValueError, match="must match"):
        gm.gated_activation(torch.ones(2), torch.ones(3))
