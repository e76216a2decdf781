"""The fused adapter linear on leantune's own low-rank tuners (Triton interpreter vs the unpatched layers)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import leantune.adapters as la
import leantune.kernels as K

from .conftest import assert_close


def _model(config):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 20), torch.nn.Tanh(), torch.nn.Linear(20, 12))
    model = get_peft_model(net, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


CONFIGS = {
    "lora_xs": lambda: la.LoraXSConfig(r=4, target_modules=["0", "2"]),
    "dylora": lambda: la.DyLoRAConfig(r=5, target_modules=["0", "2"]),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_fused_lowrank_layers_match_unpatched_forward_and_grads(method, triton_on):
    model = _model(CONFIGS[method]())
    model.train()
    if method == "dylora":
        model.base_model.sample_rank()
        for layer in (m for m in model.modules() if isinstance(m, la.LowRankLayer)):
            layer.sampled_rank["default"] = 3  # frozen mode: only component 3 trains
    x = torch.randn(9, 24)
    y_ref = model.base_model.model(x)
    y_ref.square().sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    assert K.apply(model, enable=["lowrank_linear"]) == {"lowrank_linear": 2}
    y = model.base_model.model(x)
    assert_close(y, y_ref)
    y.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads_ref[n], factor=5.0)
    assert K.restore(model) == 2


def test_allora_keeps_its_custom_backward_under_the_kernels(triton_on):
    model = _model(la.ALLoRAConfig(r=4, target_modules=["0", "2"]))
    x = torch.randn(5, 24)
    with torch.no_grad():
        inference_ref = model.base_model.model(x)
    model.base_model.model(x).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    K.apply(model, enable=["lowrank_linear"])
    model.base_model.model(x).sum().backward()  # training: falls back to ALLoRA's own Function
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_ref[n])
    with torch.no_grad():  # inference: a plain product, so the fused kernel runs
        assert_close(model.base_model.model(x), inference_ref)


def _saved_bytes(model, x) -> int:
    from leantune._utils import storage_bytes

    saved = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model.base_model.model(x)
    out.sum().backward()
    return storage_bytes(t for t in saved if t.untyped_storage().data_ptr() not in params)


def test_nola_keeps_its_saving_under_the_fused_kernels(triton_on):
    """Training NOLA under kernels.apply keeps its own function, which regenerates the k + l bases in backward: the
    fused linear would differentiate the materialised factors and autograd would save every basis chunk."""
    model = _model(la.NolaConfig(r=4, num_basis_A=64, num_basis_B=64, target_modules=["0", "2"]))
    x = torch.randn(9, 24)
    plain = _saved_bytes(model, x)
    K.apply(model, enable=["lowrank_linear"])
    fused = _saved_bytes(model, x)
    assert fused == plain
    bases = 4 * (64 * 4 * 24 + 64 * 20 * 4)  # the A and B bases of the first layer alone, fp32
    assert fused < bases
    with torch.no_grad():  # outside training the materialised factors are used (and fused)
        assert all(layer.forward_factors("default") is not None for layer in model.modules()
                   if isinstance(layer, la.LowRankLayer))
    K.restore(model)
