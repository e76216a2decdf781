"""ALLoRA and DyLoRA against hand-written references of their formulas."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import leantune.adapters as la
from leantune.adapters.allora import ALLoRALayer, adaptive_coefficient

from .models import batch_for, tiny_model


def single_layer(config_cls, **kw):
    """An adapted 1-layer model: ``lin`` (8 → 6) wrapped by the method."""
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(8, 6))
    peft_model = get_peft_model(model, config_cls(target_modules=["lin"], **kw))
    return peft_model, peft_model.base_model.model.lin


def test_allora_has_no_dropout_no_scaling_and_eta_at_init():
    _, layer = single_layer(la.ALLoRAConfig, r=3, eta=2.0)
    assert not hasattr(layer, "lora_dropout") and not hasattr(layer, "scaling")
    c_out, _, _ = layer.coefficients("default")
    torch.testing.assert_close(c_out, torch.full((6,), 2.0))  # B = 0 → c = η


@pytest.mark.parametrize("squared", [False, True])
def test_allora_gradients_equal_rowwise_scaled_delta_w_reference(squared):
    _, layer = single_layer(la.ALLoRAConfig, r=3, eta=1.5, squared=squared)
    with torch.no_grad():
        layer.allora_B["default"].normal_()
    a = layer.allora_A["default"].detach().clone().double().requires_grad_()
    b = layer.allora_B["default"].detach().clone().double().requires_grad_()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    w_out = torch.randn(4, 5, 6, dtype=torch.float64)
    layer.double()

    # reference: materialise ΔW = B A, scale the gradient flowing into row i of ΔW by c_i with a hook
    delta = b @ a
    row = delta.detach().norm(dim=1)
    c = 1.0 / torch.sqrt((row**2 if squared else row) + 1 / 1.5**2)
    delta.register_hook(lambda g: g * c[:, None])
    x_ref = x.clone().requires_grad_()
    ((x_ref @ delta.T) * w_out).sum().backward()

    x_ours = x.clone().requires_grad_()
    (layer.adapter_output(x_ours, "default") * w_out).sum().backward()
    torch.testing.assert_close(layer.allora_A["default"].grad, a.grad)
    torch.testing.assert_close(layer.allora_B["default"].grad, b.grad)
    # the input gradient is that of plain (unscaled) LoRA: xAᵀBᵀ
    x_plain = x.clone().requires_grad_()
    ((x_plain @ (b.detach() @ a.detach()).T) * w_out).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_plain.grad)


def test_allora_param_row_variant_scales_each_parameters_rows():
    _, layer = single_layer(la.ALLoRAConfig, r=3, eta=2.0, norm_of="param_row")
    layer.double()
    with torch.no_grad():
        layer.allora_B["default"].normal_()
    a0, b0 = layer.allora_A["default"].detach().clone(), layer.allora_B["default"].detach().clone()
    x = torch.randn(7, 8, dtype=torch.float64)
    w_out = torch.randn(7, 6, dtype=torch.float64)
    (layer.adapter_output(x, "default") * w_out).sum().backward()
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    ((x @ a.T @ b.T) * w_out).sum().backward()
    c_a = adaptive_coefficient(a0.norm(dim=1), 2.0, False)
    c_b = adaptive_coefficient(b0.norm(dim=1), 2.0, False)
    torch.testing.assert_close(layer.allora_A["default"].grad, a.grad * c_a[:, None])
    torch.testing.assert_close(layer.allora_B["default"].grad, b.grad * c_b[:, None])


def test_allora_input_gradient_matches_plain_lora_in_a_full_model():
    batch = batch_for("llama")
    model = get_peft_model(tiny_model("llama"), la.ALLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for layer in (m for m in model.modules() if isinstance(m, ALLoRALayer)):
        with torch.no_grad():
            layer.allora_B["default"].normal_()
    model.train()
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    model(inputs_embeds=emb, labels=batch["labels"]).loss.backward()
    ours = emb.grad.clone()
    emb2 = emb.detach().clone().requires_grad_()
    # the same model computed with the plain formula (no custom Function)
    for layer in (m for m in model.modules() if isinstance(m, ALLoRALayer)):
        layer.adapter_output = lambda x, ad, layer=layer: torch.nn.functional.linear(
            torch.nn.functional.linear(x, layer.allora_A[ad]), layer.allora_B[ad])
    model(inputs_embeds=emb2, labels=batch["labels"]).loss.backward()
    torch.testing.assert_close(ours, emb2.grad)


def test_dylora_forward_at_sampled_rank_is_truncated_lora():
    peft_model, layer = single_layer(la.DyLoRAConfig, r=4, lora_alpha=6.0)
    with torch.no_grad():
        layer.dylora_B["default"].normal_()
    a, b = layer.dylora_A["default"].detach(), layer.dylora_B["default"].detach()
    x = torch.randn(3, 8)
    peft_model.train()
    for _ in range(6):
        ranks = peft_model.base_model.sample_rank()
        rank = ranks["default"]
        expected = layer.base_layer(x) + (6.0 / rank) * x @ a[:rank].T @ b[:, :rank].T
        torch.testing.assert_close(layer(x), expected)


def test_dylora_frozen_mode_trains_only_component_b():
    peft_model, layer = single_layer(la.DyLoRAConfig, r=4)
    with torch.no_grad():
        layer.dylora_B["default"].normal_()
    layer.train()
    layer.sampled_rank["default"] = 3
    layer(torch.randn(5, 8)).sum().backward()
    grad_a, grad_b = layer.dylora_A["default"].grad, layer.dylora_B["default"].grad
    assert grad_a[2].abs().sum() > 0 and grad_b[:, 2].abs().sum() > 0
    assert torch.all(grad_a[[0, 1, 3]] == 0) and torch.all(grad_b[:, [0, 1, 3]] == 0)


def test_dylora_any_rank_usable_at_inference_and_merge():
    peft_model, layer = single_layer(la.DyLoRAConfig, r=4, lora_alpha=4.0)
    with torch.no_grad():
        layer.dylora_B["default"].normal_()
    a, b = layer.dylora_A["default"].detach(), layer.dylora_B["default"].detach()
    x = torch.randn(3, 8)
    peft_model.eval()
    for rank in (1, 2, 4):
        peft_model.base_model.set_eval_rank(rank)
        delta = (4.0 / rank) * b[:, :rank] @ a[:rank]
        torch.testing.assert_close(layer.get_delta_weight("default"), delta)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)
    with pytest.raises(ValueError, match="rank must be"):
        peft_model.base_model.set_eval_rank(5)


def test_dylora_sampler_does_not_touch_global_rng():
    peft_model, _ = single_layer(la.DyLoRAConfig, r=8, seed=123)
    peft_model.train()
    state = torch.random.get_rng_state()
    drawn = [peft_model.base_model.sample_rank()["default"] for _ in range(20)]
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(set(drawn)) > 3 and all(1 <= b <= 8 for b in drawn)
    other, _ = single_layer(la.DyLoRAConfig, r=8, seed=123)
    assert [other.base_model.sample_rank()["default"] for _ in range(20)] == drawn


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="r_min"):
        la.DyLoRAConfig(r=4, r_min=5)
    with pytest.raises(ValueError, match="eta"):
        la.ALLoRAConfig(eta=0)
    with pytest.raises(ValueError, match="positive integer"):
        la.LoraXSConfig(r=0)
    with pytest.raises(ValueError, match="norm_of"):
        la.ALLoRAConfig(norm_of="columns")
