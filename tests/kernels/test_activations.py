"""ReGELU2 / ReSiLU2: Triton (interpreter) vs torch reference, and the reference vs the paper's definition."""

import math

import pytest
import torch
import torch.nn.functional as F

from leantune.kernels import activations as act

from .conftest import DTYPES, assert_close

SHAPES = [(1, 1), (3, 37), (2, 5, 211), (1, 1031)]  # single element/row, non-powers of two, a partial code byte
CASES = [("regelu2", "none"), ("regelu2", "tanh"), ("resilu2", "none")]


def test_step_slopes_match_spec_table():
    assert act.step_slopes("regelu2") == pytest.approx((-0.0492226, 1.0487406, 1.0), abs=1e-7)
    assert act.step_slopes("resilu2") == pytest.approx((-0.0406036, 1.0403219, 1.0), abs=1e-7)
    for kind in ("regelu2", "resilu2"):  # Σ a_i c_i = 0: h̃(x) → x without offset
        a, c = act._CONSTANTS[kind]
        assert abs(sum(ai * ci for ai, ci in zip(a, c))) < 1e-12


def test_pack_layout_and_roundtrip():
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    packed = act.pack_2bit(codes)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4, 3]  # element i at bits 2·(i mod 4), little-endian in a byte
    rand = torch.randint(0, 4, (1001,), dtype=torch.uint8)
    assert torch.equal(act.unpack_2bit(act.pack_2bit(rand), 1001), rand)
    for start in range(4):  # views starting at any byte offset (the fast path reads 4 codes as one int32)
        view = rand[start:start + 997]
        assert torch.equal(act.unpack_2bit(act.pack_2bit(view), 997), view)


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "torch-ops"])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_flags_and_backward_equal_their_definitions(dtype, chunk, native, monkeypatch):
    """The packed flags equal Σ[x > c_i] (compared in fp32) element by element, and the backward equals
    ``grad · table[flag]`` with one rounding, at and next to the thresholds too (chunk=8: many chunks), on both CPU
    paths (the C kernels of ``cpu_native`` and the torch ops)."""
    if chunk:
        monkeypatch.setattr(act, "_CHUNK", chunk)
    _, thresholds = act._CONSTANTS["regelu2"]
    near = torch.tensor([c + d for c in thresholds for d in (-1e-3, 0.0, 1e-3)])
    x = torch.cat([near, torch.randn(1000) * 4]).to(dtype)
    xf = x.float()
    flags = sum((xf > c).to(torch.uint8) for c in thresholds)
    packed = act.packed_step_flags(x, thresholds, native=native)
    assert torch.equal(act.unpack_2bit(packed, x.numel()), flags)
    grad = torch.randn(x.shape).to(dtype)
    table = torch.tensor((0.0, *act.step_slopes("regelu2")))
    expected = (grad.float() * table[flags.long()]).to(dtype)
    assert torch.equal(act.packed_step_backward(grad, packed, act.step_slopes("regelu2"), native=native), expected)
    if dtype != torch.float32:  # the 16-bit lookup table, checked on every bit pattern (NaN and inf included)
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
        expected_flags = sum((every.float() > c).to(torch.uint8) for c in thresholds)
        assert torch.equal(act.unpack_2bit(act.packed_step_flags(every, thresholds, native=native), 1 << 16),
                           expected_flags)
    with pytest.raises(ValueError, match="code bytes"):
        act.packed_step_backward(grad[:-8], packed, act.step_slopes("regelu2"), native=native)


@pytest.mark.parametrize("kind,approximate", CASES)
def test_reference_is_exact_forward_and_step_backward_in_float64(kind, approximate):
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    y, codes = act.reference_approx_activation(x, kind, approximate)
    exact = F.silu(x) if kind == "resilu2" else F.gelu(x, approximate=approximate)
    assert torch.equal(y, exact)
    grad = act.reference_approx_backward(torch.ones_like(x), codes, kind)
    (a1, a2, a3), (c1, c2, c3) = act._CONSTANTS[kind]
    expected = a1 * (x > c1) + a2 * (x > c2) + a3 * (x > c3)  # d/dx Σ a_i ReLU(x − c_i)
    assert torch.allclose(grad, expected.to(grad.dtype), atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,approximate", CASES)
def test_triton_forward_backward_match_reference(kind, approximate, shape, dtype):
    x = (torch.randn(shape) * 4).to(dtype)
    y, codes = act.triton_approx_activation(x, kind, approximate)
    y_ref, codes_ref = act.reference_approx_activation(x, kind, approximate)
    assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(x.numel() / 4)
    assert torch.equal(codes, codes_ref)
    assert_close(y, y_ref, dtype)
    g = torch.randn(shape).to(dtype)
    assert_close(act.triton_approx_backward(g, codes, kind), act.reference_approx_backward(g, codes_ref, kind), dtype)


@pytest.mark.parametrize("kind", ["regelu2", "resilu2"])
def test_autograd_through_registered_kernel(kind, triton_on):
    x = torch.randn(4, 33, requires_grad=True)
    fn = act.regelu2 if kind == "regelu2" else act.resilu2
    fn(x).backward(torch.ones_like(x))
    grad_triton = x.grad.clone()
    x.grad = None
    y_ref, codes = act.reference_approx_activation(x.detach(), kind)
    assert_close(grad_triton, act.reference_approx_backward(torch.ones_like(x), codes, kind))


def test_saves_only_packed_codes():
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        act.resilu2(x)
    assert [t.dtype for t in saved] == [torch.uint8] and saved[0].numel() == x.numel() // 4


def test_bad_approximate_raises():
    with pytest.raises(ValueError, match="approximate"):
        act.reference_approx_activation(torch.ones(2), "resilu2", "tanh")
