"""leantune.kernels.apply / restore on transformers + peft models."""

import pytest
import torch
from torch import nn

import leantune.kernels as K

from .conftest import assert_close
from .tiny_models import tiny_llama


def test_default_on_cpu_patches_nothing():
    model = tiny_llama()
    assert K.apply(model) == {}
    assert K.patched_modules(model) == {}


def test_apply_counts_restore_and_disable():
    model = tiny_llama()
    counts = K.apply(model, enable=True)
    assert counts == {"lora_linear": 14, "lowrank_linear": 0, "ms_rmsnorm": 5, "ms_layernorm": 0, "gated_mlp": 2}
    assert K.restore(model) == 21 and K.patched_modules(model) == {}
    counts = K.apply(model, enable=True, disable=["lora_linear", "lowrank_linear", "gated_mlp"])
    assert counts == {"ms_rmsnorm": 5, "ms_layernorm": 0}
    assert set(K.patched_modules(model).values()) == {"ms_rmsnorm"}
    K.apply(model, enable=False)
    assert K.patched_modules(model) == {}


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown kernel"):
        K.apply(nn.Linear(2, 2), enable=["fast_everything"])
    with pytest.raises(ValueError, match="unknown kernel"):
        K.apply(nn.Linear(2, 2), disable=["nope"])


def test_patched_model_matches_unpatched_forward_and_grads_cpu_reference():
    """enable=True on CPU: the torch-reference paths must reproduce the model exactly (up to rounding)."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    K.apply(model, enable=True)
    out2 = model(input_ids=ids, labels=ids)
    out2.loss.backward()
    assert_close(out2.logits, out.logits)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, ref[n], factor=10.0)


def test_layernorm_and_approximate_activations():
    model = nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 48), nn.GELU(approximate="tanh"), nn.Linear(48, 24), nn.SiLU())
    x = torch.randn(5, 24)
    y_ref = model(x)
    counts = K.apply(model, enable=["ms_layernorm", "regelu2", "resilu2"])
    assert counts == {"ms_layernorm": 1, "regelu2": 1, "resilu2": 1}
    with K.force_triton():
        y = model(x)
    assert_close(y, y_ref)  # forward is exact; only the activation gradients are approximate
    K.restore(model)


def test_modules_with_foreign_instance_forward_are_left_alone():
    norm = nn.LayerNorm(8)
    norm.forward = lambda x: x  # e.g. an accelerate hook
    assert K.apply(nn.Sequential(norm), enable=["ms_layernorm"]) == {"ms_layernorm": 0}
