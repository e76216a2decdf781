"""Blockwise INT8/INT4 quantization with stochastic rounding, and the INT8 linear (Q-GaLore's quantized weights),
against hand-written float64 formulas."""

import math

import pytest
import torch
from torch import nn

from leantune.kernels.int8_linear import Int8Linear, dequantized_weight, is_int8_weight
from leantune.kernels.quantize import (
    dequantize,
    dequantize_int4,
    pack_int4,
    quantize,
    quantize_int4,
    stochastic_seed,
    unpack_int4,
)

from .conftest import assert_close


def _hand_absmax(x: torch.Tensor, bits: int, block: int, per_row: bool):
    """The blockwise absmax formula, element by element in float64: codes and scales."""
    top = 2 ** (bits - 1) - 1
    x = x.double()
    rows = [r for r in x] if per_row else [x.reshape(-1)]
    codes, scales = [], []
    for row in rows:
        row_codes = []
        for start in range(0, row.numel(), block):
            chunk = row[start:start + block]
            s = chunk.abs().max().item() / top
            scales.append(s)
            row_codes += [0 if s == 0 else max(-top, min(top, round(v / s))) for v in chunk.tolist()]
        codes.append(row_codes)
    return codes, scales


@pytest.mark.parametrize("shape,per_row", [((5, 300), True), ((4, 256), True), ((3, 7), False), ((6, 512), False)])
def test_int8_round_trip_matches_hand_formula(shape, per_row):
    x = torch.randn(shape) * 0.05
    codes, scales = quantize(x, 8, 256, per_row=per_row)
    hand_codes, hand_scales = _hand_absmax(x, 8, 256, per_row)
    flat = codes.reshape(-1).tolist() if per_row else codes[: x.numel()].tolist()
    assert flat == [c for row in hand_codes for c in row]
    assert torch.allclose(scales.double(), torch.tensor(hand_scales, dtype=torch.float64), rtol=1e-6)
    back = dequantize(codes, scales, x.shape, 256, per_row=per_row)
    # each element within half a step of its block
    step = torch.tensor(hand_scales).float()
    assert (back - x).abs().max() <= step.max() / 2 + 1e-7


def test_zero_block_and_one_sided_blocks_stay_exact():
    """absmax has no zero point: an all-zero block is zeros, an all-positive block keeps its maximum exactly
    (Q-GaLore's min/max scheme clips a block that does not straddle 0)."""
    x = torch.cat([torch.zeros(256), torch.linspace(0.5, 1.0, 256)])
    codes, scales = quantize(x, 8, 256)
    back = dequantize(codes, scales, x.shape, 256)
    assert torch.equal(back[:256], torch.zeros(256))
    assert back[256:].max().item() == pytest.approx(1.0, rel=1e-6)
    assert (back - x).abs().max() <= 1.0 / 127 / 2 + 1e-7
    mcodes, mscales = quantize(x, 8, 256, scheme="minmax")
    assert (dequantize(mcodes, mscales, x.shape, 256) - x).abs().max() > 0.4  # the clipping the spec measured


def test_int4_pack_round_trip():
    codes = torch.randint(-8, 8, (512,), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 256
    assert torch.equal(unpack_int4(packed), codes)
    x = torch.linalg.qr(torch.randn(64, 8)).Q  # orthonormal columns, like a left projector
    packed, scales = quantize_int4(x, 256)
    assert packed.numel() == math.ceil(x.numel() / 256) * 128
    hand_codes, hand_scales = _hand_absmax(x, 4, 256, per_row=False)
    deq = torch.tensor(hand_codes[0], dtype=torch.float64).reshape(-1, 256) * torch.tensor(hand_scales)[:, None]
    assert torch.allclose(dequantize_int4(packed, scales, x.shape, 256).double(), deq.reshape(x.shape), atol=1e-7)


def test_stochastic_rounding_unbiased_with_hand_variance():
    """E[deq(SR(x))] = x and Var = s² f (1 − f) per element (f: the fractional part of x / s), over 20k draws, within
    5 standard errors; the block maximum included (absmax: the clamp never bites)."""
    torch.manual_seed(1)
    x = torch.randn(256) * 0.02
    scale = (x.abs().max() / 127).double()
    f = (x.double() / scale) - (x.double() / scale).floor()
    var = scale**2 * f * (1 - f)
    draws = 20000
    gen = torch.Generator().manual_seed(3)
    total = torch.zeros(256, dtype=torch.float64)
    total_sq = torch.zeros(256, dtype=torch.float64)
    for _ in range(draws):
        codes, s = quantize(x, 8, 256, generator=gen)
        d = dequantize(codes, s, x.shape, 256).double()
        total += d
        total_sq += d * d
    mean = total / draws
    emp_var = total_sq / draws - mean**2
    se = (var / draws).sqrt().clamp_min(1e-12)
    assert ((mean - x.double()).abs() <= 5 * se + 1e-9).all()
    assert torch.allclose(emp_var, var, atol=float(scale**2) * 0.02)
    nearest, s = quantize(x, 8, 256)
    biased = (dequantize(nearest, s, x.shape, 256).double() - x.double()).abs()
    assert biased.max() > 10 * se.max()  # nearest rounding is not unbiased: the test can tell them apart


def test_stochastic_rounding_is_seeded():
    x = torch.randn(4, 300)
    a = quantize(x, 8, 256, per_row=True, generator=torch.Generator().manual_seed(stochastic_seed(0, 3, 7)))[0]
    b = quantize(x, 8, 256, per_row=True, generator=torch.Generator().manual_seed(stochastic_seed(0, 3, 7)))[0]
    c = quantize(x, 8, 256, per_row=True, generator=torch.Generator().manual_seed(stochastic_seed(0, 3, 8)))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({stochastic_seed(0, i, s) for i in range(50) for s in range(50)}) == 2500


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [256, 300])
@pytest.mark.parametrize("x_grad", [True, False])
def test_int8_linear_matches_dequantized_reference(dtype, in_features, x_grad):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 48).to(dtype)
    q = Int8Linear.from_linear(lin)
    assert is_int8_weight(q.weight) and q.weight.dtype == torch.int8
    W = q.dequantized(torch.float32)
    x = torch.randn(3, 5, in_features, dtype=dtype, requires_grad=x_grad)
    out = q(x)
    ref_w = W.to(dtype).clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_(x_grad)
    # x·Wᵀ then + b, as the layer computes it (a fused addmm rounds differently on some CPU paths:
    # MKL_ENABLE_INSTRUCTIONS=AVX2 at in_features=300)
    ref = torch.nn.functional.linear(ref_x, ref_w) + lin.bias
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert_close(out, ref, dtype)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert q.weight.qgrad is not None, "the weight gradient must exist even when x does not require grad"
    assert_close(q.weight.qgrad.float(), ref_w.grad.float(), dtype)
    if x_grad:
        assert_close(x.grad, ref_x.grad, dtype)
    # gradient accumulation adds
    q(x).backward(g)
    assert_close(q.weight.qgrad.float(), 2 * ref_w.grad.float(), dtype)


def test_int8_linear_state_dict_and_dtype_cast():
    """state_dict holds deq(W) in the float dtype (a plain nn.Linear loads it and computes the same), plus the
    scales, from which an Int8Linear recovers its codes exactly; a float checkpoint is quantized on load."""
    lin = nn.Linear(300, 16)
    q = Int8Linear.from_linear(lin)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.float32 and sd["weight_scale"].dtype == torch.float32
    assert torch.equal(sd["weight"], q.dequantized())
    assert q.weight.numel() + 4 * q.weight_scale.numel() < lin.weight.numel() * 4 / 3.8  # what it holds in memory
    plain = nn.Linear(300, 16)
    plain.load_state_dict({k: v for k, v in sd.items() if k != "weight_scale"})
    x = torch.randn(4, 300)
    assert torch.equal(plain(x), torch.nn.functional.linear(x, q.dequantized(), q.bias))
    q2 = Int8Linear(300, 16)
    q2.load_state_dict(sd)
    assert torch.equal(q2.weight, q.weight) and torch.equal(q2.weight_scale, q.weight_scale)
    q3 = Int8Linear(300, 16)
    q3.load_state_dict(lin.state_dict())  # a float checkpoint
    assert torch.equal(q3.weight, q.weight) and torch.equal(q3.weight_scale, q.weight_scale)
    q.to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert q.weight.int8_module is q and q.state_dict()["weight"].dtype == torch.bfloat16
    q4 = Int8Linear(300, 16)
    q4.load_state_dict(q.state_dict())  # through bf16: the codes still come back exactly (7 bits needed, 8 kept)
    assert torch.equal(q4.weight, q2.weight)
    assert torch.equal(dequantized_weight(q.weight, q.weight_scale, 256), q2.dequantized())


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("in_features", [64, 100])
def test_triton_int8_matmul_matches_reference(triton_on, transpose, in_features):
    from leantune.kernels.int8_linear import int8_matmul

    torch.manual_seed(0)
    codes, scales = quantize(torch.randn(40, in_features), 8, 32, per_row=True)
    k = in_features if transpose else 40
    x = torch.randn(7, k)
    got = int8_matmul(x, codes, scales, 32, transpose)
    w = dequantize(codes, scales, codes.shape, 32, per_row=True)
    ref = x @ (w.t() if transpose else w)
    assert_close(got, ref)


def test_row_chunks_give_the_whole_matrix_result(monkeypatch):
    """(De)quantizing a few rows at a time (bounded temporaries) equals doing the whole matrix at once."""
    import leantune.kernels.int8_linear as il

    lin = nn.Linear(300, 40)
    whole = Int8Linear.from_linear(lin)
    monkeypatch.setattr(il, "CHUNK_NUMEL", 700)  # two rows of 300 per chunk
    chunked = Int8Linear.from_linear(lin)
    assert torch.equal(chunked.weight, whole.weight) and torch.equal(chunked.weight_scale, whole.weight_scale)
    ref = dequantize(whole.weight, whole.weight_scale, whole.weight.shape, 256, per_row=True)
    assert torch.equal(chunked.dequantized(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 256), (33, 300), (5, 7)])
def test_c_dequantization_is_the_torch_reference_bit_for_bit(dtype, shape):
    """The CPU's one-pass C loop (``csrc/int8_dequant.c``) gives the four-pass torch reference's bits."""
    from leantune.kernels import cpu_native

    codes, scales = quantize(torch.randn(shape) * 0.03, 8, 256, per_row=True)
    native = cpu_native.int8_dequant(codes, scales, 256, dtype)
    if native is None:
        pytest.skip("no C compiler here: the torch reference is the CPU path")  # same bits either way
    assert torch.equal(native, dequantize(codes, scales, shape, 256, per_row=True, dtype=dtype))
