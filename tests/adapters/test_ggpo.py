"""LoRA-GGPO against its formula evaluated by hand: the perturbed output, σ from weight and gradient norms, the
Jacobian-vector gradient of ΔW, and what it must not touch (base weights, the global RNG, eval mode)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import leantune
from leantune.adapters.ggpo import GGPO, GGPOCallback


def _model(config=None, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6)).to(dtype)
    model = get_peft_model(base, config or LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    return model.to(dtype)


def _merged(layer):
    adapter = layer.active_adapters[0]
    return layer.get_base_layer().weight + layer.get_delta_weight(adapter)


def test_output_is_the_merged_weight_plus_row_scaled_noise():
    model = _model()
    ggpo = GGPO(model, sigma=0.05, beta=0.02, seed=7)
    x = torch.randn(5, 12, dtype=torch.float64)
    out = model(x)
    gen = torch.Generator().manual_seed(7)
    h = x
    inner = model.base_model.model
    with torch.no_grad():
        for i in (0, 2):
            layer = inner[i]
            W = _merged(layer)
            std = (0.05 * W.norm(dim=1)) / math.sqrt(W.shape[1])  # first step: no gradient term yet
            eps = torch.randn(W.shape[0], W.shape[1], generator=gen).double() * std[:, None]
            h = nn.functional.linear(h, W + eps, layer.get_base_layer().bias)
            if i == 0:
                h = torch.tanh(h)
    torch.testing.assert_close(out.detach(), h, rtol=1e-10, atol=1e-12)
    ggpo.remove()
    torch.testing.assert_close(model(x), inner(x))  # removed: the plain adapter


def test_gradient_norm_term_lora_and_lora_xs():
    model = _model()
    ggpo = GGPO(model, sigma=0.05, beta=0.02)
    model(torch.randn(8, 12, dtype=torch.float64)).square().sum().backward()
    ggpo.after_backward()
    layer = model.base_model.model[0]
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    G = s * (B.grad @ A + B @ A.grad)  # ∇ΔW implied by the factors' gradients
    torch.testing.assert_close(ggpo.grad_norms[layer].double(), G.norm(dim=1), rtol=1e-6, atol=1e-9)
    W = _merged(layer).detach()
    expected = (0.05 * W.norm(dim=1) + 0.02 * G.norm(dim=1) ** 2) / math.sqrt(12)
    torch.testing.assert_close(ggpo.row_std(layer).double(), expected, rtol=1e-5, atol=1e-8)

    xs = _model(leantune.LoraXSConfig(r=4, target_modules=["0"], init_weights=False))
    ggpo = GGPO(xs, beta=0.02)
    xs(torch.randn(8, 12, dtype=torch.float64)).square().sum().backward()
    ggpo.after_backward()
    layer = xs.base_model.model[0]
    R = layer.loraxs_R["default"]
    G = layer.scaling["default"] * layer.loraxs_B["default"].double() @ R.grad @ layer.loraxs_A["default"].double()
    torch.testing.assert_close(ggpo.grad_norms[layer].double(), G.norm(dim=1), rtol=1e-6, atol=1e-9)


def test_functional_private_and_training_only():
    model = _model(dtype=torch.bfloat16)
    base = model.base_model.model[0].get_base_layer().weight.detach().clone()
    ggpo = GGPO(model)
    torch.manual_seed(3)
    reference_draw = torch.rand(3)
    torch.manual_seed(3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 12, dtype=torch.bfloat16)).float().square().sum().backward()
        ggpo.after_backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), reference_draw)  # the global RNG is not used
    assert torch.equal(model.base_model.model[0].get_base_layer().weight, base)  # never modified in place
    model.eval()
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    assert torch.equal(model(x), model(x))  # no noise in eval mode


def test_cosine_ramp_and_bad_options():
    model = _model()
    ggpo = GGPO(model, ramp="cosine", total_steps=10)
    assert ggpo.factor() == 0.0
    ggpo.step = 5
    assert ggpo.factor() == pytest.approx(0.5)
    for kwargs in ({"sigma": -1}, {"beta": "x"}, {"ramp": "linear"}, {"norm_features": "rows"}):
        with pytest.raises(ValueError):
            GGPO(model, **kwargs)
    with pytest.raises(ValueError, match="total_steps"):
        GGPO(model, ramp="cosine")
    with pytest.raises(ValueError, match="no LoRA-type layer"):
        GGPO(nn.Linear(3, 3))


def test_trainer_callback(tmp_path):
    import datasets
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)
    model = get_peft_model(T.LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 32, (8, 8))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    callback = GGPOCallback(ramp="cosine")
    trainer = T.Trainer(model=model, train_dataset=data, callbacks=[callback], args=T.TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no"))
    trainer.train()
    assert callback.ggpo is None  # detached at the end
    assert all(not m._forward_hooks for m in model.modules() if hasattr(m, "lora_A"))
