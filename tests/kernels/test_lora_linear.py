"""Fused adapter linear: Triton (interpreter) vs reference, forward and every gradient; peft lora.Linear swap."""

import pytest
import torch
from torch import nn

from leantune.kernels import lora_linear as ll

from .conftest import DTYPES, assert_close

# (batch shape, K in, N out, rank): single row, non-powers of two, rank > tile, rank > min(K, N)
SHAPES = [((1,), 24, 40, 4), ((2, 7), 45, 29, 5), ((37,), 70, 66, 8), ((9,), 33, 20, 96)]


def _inputs(batch, k, n, r, dtype, bias=True):
    x = torch.randn(*batch, k).to(dtype).requires_grad_()
    w = (torch.randn(n, k) / k**0.5).to(dtype).requires_grad_()
    b = torch.randn(n).to(dtype).requires_grad_() if bias else None
    a = (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_()
    bb = (torch.randn(n, r) / r**0.5).to(dtype).requires_grad_()
    return x, w, b, a, bb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,k,n,r", SHAPES)
def test_forward_and_all_gradients_match_reference(batch, k, n, r, dtype):
    x, w, b, a, bb = _inputs(batch, k, n, r, dtype)
    y = ll.FusedLoRALinearFunction.apply(x, w, b, a, bb, 1.75)
    # the reference in fp32 from the same (rounded) inputs: the kernel accumulates in fp32 too
    ref_inputs = [t.detach().float().requires_grad_() for t in (x, w, b, a, bb)]
    y_ref = ll.reference_lora_linear(*ref_inputs, 1.75)
    assert y.dtype == dtype and y.shape == (*batch, n)
    assert_close(y, y_ref, dtype)
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, (x, w, b, a, bb), dy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy)
    for name, got, want in zip(("x", "W", "bias", "A", "B"), grads, grads_ref):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, factor=2.0)


def test_matches_reference_in_reduced_precision_and_without_bias(triton_on):
    x, w, _, a, bb = _inputs((5,), 30, 18, 3, torch.bfloat16, bias=False)
    w.requires_grad_(False)
    y = ll.fused_lora_linear(x, w, None, a, bb, 0.5)  # dispatches to Triton under force_triton
    y_ref = ll.reference_lora_linear(x, w, None, a, bb, 0.5)  # bf16 torch with bf16 intermediates
    assert_close(y, y_ref, torch.bfloat16, factor=2.0)
    y.sum().backward()
    assert w.grad is None and a.grad is not None and bb.grad is not None


def test_backward_saves_rank_r_intermediate_not_outputs(triton_on):
    x, w, b, a, bb = _inputs((16,), 40, 48, 4, torch.float32)
    w.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ll.fused_lora_linear(x, w, b, a, bb, 2.0)
    activations = [t for t in saved if t.data_ptr() not in {p.data_ptr() for p in (w, a, bb)}]
    assert sorted(tuple(t.shape) for t in activations) == [(16, 4), (16, 40)]  # X and S = X Aᵀ only


def test_shape_and_dtype_errors_name_the_problem():
    x, w, b, a, bb = _inputs((3,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="do not chain"):
        ll.fused_lora_linear(x, w.t(), b, a, bb, 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        ll.fused_lora_linear(x, w.half(), b, a, bb, 1.0)


def _peft_model(dropout=0.0):
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 12))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)  # make the adapter path non-zero
    return model


def test_patched_peft_lora_matches_peft_forward_and_grads(triton_on):
    import leantune.kernels as K

    model = _peft_model()
    x = torch.randn(7, 24)
    y_ref = model(x)
    y_ref.square().sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    counts = K.apply(model, enable=["lora_linear"])
    assert counts == {"lora_linear": 2}
    y = model(x)
    assert_close(y, y_ref)
    y.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads_ref[n], factor=5.0)
    assert K.restore(model) == 2 and "forward" not in model.base_model.model[0].__dict__


def test_patched_peft_lora_falls_back_when_dropout_active(monkeypatch, triton_on):
    import leantune.kernels as K

    model = _peft_model(dropout=0.3)
    K.apply(model, enable=["lora_linear"])
    monkeypatch.setattr(ll, "FusedLoRALinearFunction", None)  # any fused call would now fail
    model.train()
    model(torch.randn(3, 24)).sum().backward()  # peft's own forward (dropout mask) is used
    model.eval()
    with pytest.raises(AttributeError):
        model(torch.randn(3, 24))  # eval: dropout is the identity → fused path is taken
