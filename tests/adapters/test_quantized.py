"""leantune adapters on bitsandbytes 8-bit and 4-bit bases (bitsandbytes runs these on the CPU)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import leantune.adapters as la
from leantune.adapters import LowRankLayer

from .models import batch_for, perturb_adapter


def tiny_model(_arch: str) -> torch.nn.Module:
    """A tiny Llama whose quantized widths are multiples of bitsandbytes' CPU block size (64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()

bnb = pytest.importorskip("bitsandbytes")


def quantize_linears(model: torch.nn.Module, bits: int, names=("q_proj", "v_proj", "down_proj")) -> None:
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and isinstance(child, torch.nn.Linear):
                if bits == 8:
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                q.load_state_dict(child.state_dict())
                setattr(parent, child_name, q.to("cpu"))


CONFIGS = {
    "lora_xs": lambda: la.LoraXSConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "allora": lambda: la.ALLoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dylora": lambda: la.DyLoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "nola": lambda: la.NolaConfig(r=4, num_basis_A=16, num_basis_B=16, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_adapter_trains_on_a_quantized_base_that_stays_quantized(method, bits):
    model = tiny_model("llama")
    quantize_linears(model, bits)
    batch = batch_for("llama")
    peft_model = get_peft_model(model, CONFIGS[method]())
    layers = [m for m in peft_model.modules() if isinstance(m, LowRankLayer)]
    assert len(layers) == 6
    for layer in layers:
        weight = layer.get_base_layer().weight
        assert weight.dtype in (torch.int8, torch.uint8) and not weight.requires_grad
    frozen = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        peft_model(**batch).loss.backward()
        opt.step()
    for layer, before in zip(layers, frozen):
        assert torch.equal(layer.get_base_layer().weight, before)
    perturb_adapter(peft_model, scale=0.5)
    with torch.no_grad():
        deltas = [layer.get_delta_weight("default") for layer in layers]
        expected = [layer.get_base_weight().float() + d for layer, d in zip(layers, deltas)]
        peft_model.merge_adapter()  # dequantize, add ΔW, requantize (peft's bitsandbytes backends)
    for layer, d, want in zip(layers, deltas, expected):
        assert layer.get_base_layer().weight.dtype in (torch.int8, torch.uint8)
        # what remains is requantization error: small against the weight, and far from ignoring ΔW
        error = torch.linalg.norm(layer.get_base_weight().float() - want)
        assert error < (0.02 if bits == 8 else 0.12) * torch.linalg.norm(want), error
        assert error < 0.5 * torch.linalg.norm(d), error


def test_lora_sb_refuses_a_quantized_base_with_a_fix():
    model = tiny_model("llama")
    quantize_linears(model, 8)
    with pytest.raises(TypeError, match="unquantized model"):
        la.get_lora_sb_model(model, la.LoraSBConfig(r=2, target_modules=["q_proj"]), [batch_for("llama")], lr=1e-3)
