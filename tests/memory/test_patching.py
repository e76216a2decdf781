"""apply()/restore() on every supported family, with and without peft adapters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import leantune.memory as lm

from .conftest import FAMILIES, batch_for, build, with_lora


def _forward(model, batch):
    out = model(**batch)
    return out.logits


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_all_techniques_keep_forward_and_undo_restores(family):
    model = with_lora(build(family))
    batch = batch_for(family)
    reference = _forward(model, batch).detach()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = lm.apply(model, lm.MemoryConfig.all())
    assert handle.counts["ms_norms"] > 0, str(handle)
    out = _forward(model, batch)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-5)  # folding rounds the fp32 weights
    out.float().pow(2).mean().backward()  # backward runs through every patched piece
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    handle.undo()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    assert torch.equal(_forward(model, batch).detach(), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_techniques_without_folding_are_bit_identical(family):
    """Fused MLP, approximate activations and VeLoRA do not touch the forward at all."""
    model = with_lora(build(family))
    batch = batch_for(family)
    reference = _forward(model, batch).detach()
    lm.apply(model, lm.MemoryConfig(ms_norms=False, velora=True))
    assert torch.equal(_forward(model, batch).detach(), reference)
    lm.restore(model)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_exact_config_gradients_match_eager(family):
    """MS norms + fused gated MLP are exact: adapter gradients equal eager ones up to float rounding.

    (With a LayerNorm β ≠ 0 the folded LoRA-A reads ŷ = (u − β)/γ instead of u, a different — documented —
    parameterisation; zero β makes the two directly comparable.)"""
    eager = with_lora(build(family))
    with torch.no_grad():
        for module in eager.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.zero_()
    patched = copy.deepcopy(eager)
    batch = batch_for(family)
    eager(**batch).loss.backward()
    lm.apply(patched, lm.MemoryConfig.exact())
    patched(**batch).loss.backward()
    ge, gp = _grads(eager), _grads(patched)
    assert ge.keys() == gp.keys()
    for name in ge:
        if "lora_B" in name:  # lora_A lives in the folded parameterisation (A' = A diag γ); B is directly comparable
            torch.testing.assert_close(gp[name], ge[name], atol=1e-5, rtol=1e-4)


def test_plain_model_without_adapters():
    model = build("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.lm_head.parameters():
        p.requires_grad_(True)
    batch = batch_for("llama")
    reference = _forward(model, batch).detach()
    handle = lm.apply(model, lm.MemoryConfig.all())
    torch.testing.assert_close(_forward(model, batch), reference, atol=2e-5, rtol=1e-5)
    assert any("trainable base weight" in line for line in handle.report)  # lm_head is trained: final norm kept
    handle.undo()


def test_unknown_architecture_is_left_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="not supported; the model was left untouched"):
        handle = lm.apply(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert "forward" not in model[1].__dict__
    handle.undo()


def test_tied_embeddings_skip_or_untie():
    model = with_lora(build("qwen2"))  # tie_word_embeddings=True, lm_head not adapted by all-linear
    handle = lm.apply(model, lm.MemoryConfig())
    assert any("tied" in line for line in handle.report)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    handle.undo()
    batch = batch_for("qwen2")
    reference = _forward(model, batch).detach()
    handle = lm.apply(model, lm.MemoryConfig(untie_embeddings=True))
    assert base.lm_head.weight is not base.model.embed_tokens.weight
    torch.testing.assert_close(_forward(model, batch), reference, atol=2e-5, rtol=1e-5)
    handle.undo()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert torch.equal(_forward(model, batch).detach(), reference)


def test_double_apply_is_refused():
    model = with_lora(build("llama"))
    lm.apply(model)
    with pytest.raises(RuntimeError, match="already patched"):
        lm.apply(model)
    lm.restore(model)
    lm.apply(model).undo()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradient_checkpointing_non_reentrant(family):
    eager = with_lora(build(family))
    patched = copy.deepcopy(eager)
    batch = batch_for(family)
    eager(**batch).loss.backward()
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    lm.apply(patched, lm.MemoryConfig.exact())
    patched(**batch).loss.backward()
    ge, gp = _grads(eager), _grads(patched)
    for name in ge:
        if "lora_B" in name:
            torch.testing.assert_close(gp[name], ge[name], atol=1e-5, rtol=1e-4)


def test_reentrant_checkpointing_on_post_norm_model_raises_clearly():
    model = with_lora(build("bert"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    with pytest.raises(ValueError, match="use_reentrant"):  # refused at setup, before anything runs
        lm.apply(model, lm.MemoryConfig.exact())
    model.gradient_checkpointing_disable()
    lm.apply(model, lm.MemoryConfig.exact())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # enabled afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="use_reentrant"):
            model(**batch_for("bert")).loss.backward()


def test_trained_adapter_after_layernorm_with_bias_keeps_its_outputs():
    """The constant s·B·A·β of a trained adapter after a LayerNorm with β ≠ 0 is kept (computed from the weights)."""
    model = with_lora(build("gpt2"), trained=True)
    batch = batch_for("gpt2")
    reference = _forward(model, batch).detach()
    lm.apply(model, lm.MemoryConfig.exact())
    torch.testing.assert_close(_forward(model, batch).detach(), reference, atol=2e-5, rtol=1e-5)
    lm.restore(model)
