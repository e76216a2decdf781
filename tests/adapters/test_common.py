"""What every peft user expects, checked for every leantune low-rank method on Llama, GPT-2 and BERT.

A new method gets the whole suite by adding one row to ``METHODS``.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel

from leantune.adapters import LowRankLayer

from .models import ARCHS, adapt, batch_for, perturb_adapter, tiny_model

METHODS = ("lora_xs", "lora_sb", "allora", "dylora", "nola")
CASES = [(m, a) for m in METHODS for a in ARCHS]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.fixture(params=CASES, ids=[f"{m}-{a}" for m, a in CASES])
def adapted(request):
    method, arch = request.param
    base = tiny_model(arch)
    batch = batch_for(arch)
    base_out = logits(base, batch)
    model = adapt(base, method, arch)
    perturb_adapter(model)
    model.eval()
    return method, arch, model, batch, base_out


def test_only_adapter_parameters_train(adapted):
    method, arch, model, _, _ = adapted
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    prefix = model.base_model.prefix
    for name in trainable:
        assert prefix in name or "modules_to_save" in name, name
    layers = [m for m in model.modules() if isinstance(m, LowRankLayer)]
    assert layers and all(not m.get_base_layer().weight.requires_grad for m in layers)


def test_training_step_moves_only_the_adapter(adapted):
    method, arch, model, batch, _ = adapted
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def test_disable_adapter_gives_base_outputs_exactly(adapted):
    _, _, model, batch, base_out = adapted
    assert not torch.allclose(logits(model, batch), base_out, atol=1e-6)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), base_out)


def test_merge_unmerge_and_merge_and_unload(adapted):
    _, _, model, batch, _ = adapted
    expected = logits(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LowRankLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_save_and_from_pretrained_reproduce_outputs_exactly(adapted, tmp_path):
    method, arch, model, batch, _ = adapted
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "adapter_model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    assert type(loaded.base_model) is type(model.base_model)
    assert torch.equal(logits(loaded, batch), expected)


def test_two_adapters_side_by_side(adapted):
    method, arch, model, batch, _ = adapted
    first = logits(model, batch)
    model.add_adapter("second", model.peft_config["default"].__class__(**{
        k: v for k, v in model.peft_config["default"].to_dict().items() if k not in ("peft_type", "peft_version")
    }))
    model.set_adapter("second")
    perturb_adapter(model, scale=0.2, seed=11)
    second = logits(model.eval(), batch)
    assert not torch.allclose(first, second, atol=1e-6)
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), first)


@pytest.mark.parametrize("method", METHODS)
def test_loading_onto_a_different_base_names_the_layer(method, tmp_path):
    model = adapt(tiny_model("llama"), method, "llama")
    model.save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"different base model.*layers\.0\.self_attn\.q_proj.*shape"):
        PeftModel.from_pretrained(other, tmp_path)
