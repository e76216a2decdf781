"""MS-RMSNorm / MS-LN: Triton (interpreter) vs reference; reference vs torch's own norms in float64."""

import pytest
import torch
import torch.nn.functional as F

from leantune.kernels import norms

from .conftest import DTYPES, assert_close

SHAPES = [(1, 7), (5, 48), (2, 3, 129), (17, 1000)]  # single row, non-power-of-two widths
KINDS = ["rmsnorm", "layernorm"]


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_torch_norm_forward_and_gradient_float64(kind):
    x = torch.randn(6, 37, dtype=torch.float64, requires_grad=True)
    eps = 1e-5
    expected = F.rms_norm(x, (37,), eps=eps) if kind == "rmsnorm" else F.layer_norm(x, (37,), eps=eps)
    dy = torch.randn_like(expected)
    (dx_expected,) = torch.autograd.grad(expected, x, dy)
    y, rstd = norms.reference_ms_norm(x.detach(), eps, kind)
    assert torch.allclose(y, expected.detach(), atol=1e-12)
    # the backward uses only (y, rstd) — never x
    assert torch.allclose(norms.reference_ms_norm_backward(dy, y, rstd, kind), dx_expected, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_function_passes_gradcheck(kind):
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: norms.MSNormFunction.apply(t, 1e-6, kind), (x,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_forward_backward_match_reference(kind, shape, dtype):
    x = (torch.randn(shape) * 3 + 0.5).to(dtype)
    y, rstd = norms.triton_ms_norm(x, 1e-6, kind)
    y_ref, rstd_ref = norms.reference_ms_norm(x, 1e-6, kind)
    assert rstd.dtype == torch.float32 and rstd.shape == shape[:-1]
    assert_close(y, y_ref, dtype)
    # the torch LayerNorm takes rstd from ATen's native_layer_norm (bit-identical y): in the input dtype for 16-bit
    # inputs, as eager LayerNorm's own backward uses it
    assert_close(rstd, rstd_ref, dtype if kind == "layernorm" else torch.float32)
    dy = torch.randn(shape).to(dtype)
    assert_close(
        norms.triton_ms_norm_backward(dy, y_ref, rstd_ref, kind),
        norms.reference_ms_norm_backward(dy, y_ref, rstd_ref, kind),
        dtype,
        factor=2.0,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_saves_output_and_rstd_only(kind, triton_on):
    x = torch.randn(4, 24, requires_grad=True)
    saved = []
    fn = norms.ms_rmsnorm if kind == "rmsnorm" else norms.ms_layernorm
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(x)
    assert len(saved) == 2
    assert saved[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # the output, shared
    assert saved[1].shape == (4, 1) and saved[1].dtype == torch.float32  # one rstd per row
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
