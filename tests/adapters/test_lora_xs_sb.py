"""LoRA-XS and LoRA-SB against independent references: SVD in float64, Eckart–Young, parameter counts."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import leantune.adapters as la
from leantune.adapters.lora_sb import LoraSBLayer
from leantune.adapters.lora_xs import LoraXSLayer

from .models import batch_for, tiny_model


def layers_of(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "down_proj"]), ("gpt2", ["c_attn", "c_proj"])])
def test_lora_xs_factors_are_the_truncated_svd_of_w(arch, targets):
    base = tiny_model(arch)
    model = get_peft_model(base, la.LoraXSConfig(r=3, target_modules=targets))
    for name, layer in layers_of(model, LoraXSLayer).items():
        w = layer.get_base_layer().weight.detach().double()
        if arch == "gpt2":
            w = w.T  # Conv1D stores (in, out)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        b, a = layer.loraxs_B["default"].double(), layer.loraxs_A["default"].double()
        torch.testing.assert_close(b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=0)
        torch.testing.assert_close(b.T @ b, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)  # B = U_r
        torch.testing.assert_close(a.norm(dim=1), s[:3], atol=1e-5, rtol=0)  # Σ absorbed into A


def test_lora_xs_trains_r_squared_per_matrix_and_starts_near_base():
    base = tiny_model("llama")
    batch = batch_for("llama")
    ref = base(input_ids=batch["input_ids"]).logits
    model = get_peft_model(base, la.LoraXSConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 3 * 5 * 5  # layers × modules × r²
    r = torch.cat([m.loraxs_R["default"].flatten() for m in layers_of(model, LoraXSLayer).values()])
    assert 0.3e-5 < r.std().item() < 3e-5  # R ~ N(0, 1e-5), not the identity
    out = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_lora_xs_with_r_identity_reproduces_truncated_w():
    model = get_peft_model(tiny_model("llama"), la.LoraXSConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = next(iter(layers_of(model, LoraXSLayer).values()))
    with torch.no_grad():
        layer.loraxs_R["default"].copy_(torch.eye(4))
    w = layer.get_base_layer().weight.detach().double()
    u, s, vh = torch.linalg.svd(w)
    expected = 2.0 * (u[:, :4] * s[:4]) @ vh[:4]  # s = α/r = 2
    torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, atol=1e-5, rtol=0)


def _first_step_reference(model, batch, module_names):
    """Gradient of the loss w.r.t. each targeted weight, computed independently with autograd.grad."""
    params = [dict(model.named_modules())[n].weight for n in module_names]
    loss = model(**batch).loss
    return dict(zip(module_names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_lora_sb_initial_update_is_best_rank_r_approximation(alpha):
    r, lr = 3, 2e-3
    base = tiny_model("llama")
    batch = batch_for("llama", 7)
    names = [n for n, _ in base.named_modules() if n.endswith(("q_proj", "down_proj"))]
    grads = _first_step_reference(base, batch, names)
    model = la.get_lora_sb_model(
        base, la.LoraSBConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "down_proj"]), [batch], lr=lr,
        progress=False,
    )
    assert model.peft_config["default"].gradient_init_done
    for name, layer in layers_of(model, LoraSBLayer).items():
        key = name.removeprefix("base_model.model.")
        delta = (-lr * torch.sign(grads[key])).double()
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        got = layer.get_delta_weight("default").double()
        torch.testing.assert_close(got, best, atol=1e-6, rtol=1e-5)
        # Eckart–Young: the residual is exactly the tail of the spectrum
        torch.testing.assert_close(torch.linalg.norm(delta - got), s[r:].square().sum().sqrt(), atol=1e-6, rtol=1e-4)
        b, a = layer.lorasb_B["default"].double(), layer.lorasb_A["default"].double()
        torch.testing.assert_close(b.T @ b, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * r * r
    # the estimate left the base untouched: no gradients, flags restored
    assert all(p.grad is None for p in model.parameters())


def test_lora_sb_output_at_init_does_not_depend_on_alpha():
    batch = batch_for("llama", 7)
    outs = []
    for alpha in (1.0, 3.0, 50.0):
        model = la.get_lora_sb_model(tiny_model("llama"), la.LoraSBConfig(r=2, lora_alpha=alpha, target_modules=["v_proj"]),
                                     [batch], lr=1e-2, progress=False)
        outs.append(model(input_ids=batch["input_ids"]).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=0)


def test_lora_sb_without_gradient_init_refuses_to_train():
    with pytest.raises(ValueError, match="get_lora_sb_model"):
        get_peft_model(tiny_model("llama"), la.LoraSBConfig(r=2, target_modules=["q_proj"]))


def test_lora_sb_rejects_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="lr"):
        la.get_lora_sb_model(model, la.LoraSBConfig(r=2, target_modules=["q_proj"]), [batch_for("llama")], lr=0)
    with pytest.raises(ValueError, match="No batches"):
        la.get_lora_sb_model(model, la.LoraSBConfig(r=2, target_modules=["q_proj"]), [], lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="matches no module"):
        la.get_lora_sb_model(model, la.LoraSBConfig(r=2, target_modules=["nope"]), [batch_for("llama")], lr=1e-3)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the failures
