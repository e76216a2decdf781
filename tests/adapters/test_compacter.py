"""Bottleneck adapters, PHM layers, Compacter and Compacter++ against hand-computed references."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from leantune.adapters.bottleneck import (
    BottleneckConfig,
    BottleneckLayer,
    CompacterConfig,
    CompacterPlusPlusConfig,
    PHMLinear,
    count_trainable,
)

from .models import perturb_adapter


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "t5":  # d_model 128 so that m = 128 / 32 = 4 is divisible by n = 4
        cfg = T5Config(vocab_size=64, d_model=128, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2,
                       num_heads=4, decoder_start_token_id=0, pad_token_id=0)
        return T5ForConditionalGeneration(cfg).eval()
    if arch == "bert":
        cfg = BertConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, num_labels=3)
        return BertForSequenceClassification(cfg).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(arch)


def inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


def logits(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(arch)).logits


# --- PHM layer -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, None])
def test_phm_weight_is_the_sum_of_kronecker_products(rank):
    torch.manual_seed(0)
    layer = PHMLinear(8, 12, n=4, rank=rank, own_rule=True)
    perturb_adapter(layer, scale=0.2, add=True)
    w = layer.W if rank is None else torch.stack([layer.W_left[i] @ layer.W_right[i] for i in range(4)])
    expected = sum(torch.kron(layer.rule[i], w[i]) for i in range(4))
    torch.testing.assert_close(layer.kron_weight(), expected)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ expected + layer.bias)


def test_phm_with_n_1_is_a_linear_layer():
    layer = PHMLinear(6, 10, n=1, rank=None, own_rule=True)
    x = torch.randn(3, 6)
    weight_t = layer.rule[0, 0, 0] * layer.W[0]  # H = W (in×out), i.e. nn.Linear with weight Hᵀ
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight_t.T, layer.bias))


def test_phm_refuses_sizes_not_divisible_by_n():
    with pytest.raises(ValueError, match="not divisible by the PHM dimension n=4"):
        PHMLinear(10, 8, n=4)


# --- placement -------------------------------------------------------------------------------------------------
EXPECTED_SITES = {
    "bert": ({"attention.output.dense", "output.dense"}, 2),
    "gpt2": ({"attn.c_proj", "mlp.c_proj"}, 2),
    "llama": ({"self_attn.o_proj", "mlp.down_proj"}, 2),
    "t5": ({"SelfAttention.o", "DenseReluDense.wo"}, 4),  # encoder + decoder blocks, no cross-attention
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_SITES))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapters_sit_after_the_sublayer_outputs(arch, placement):
    model = get_peft_model(tiny(arch), BottleneckConfig(placement=placement, reduction_factor=8))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]
    suffixes, blocks = EXPECTED_SITES[arch]
    attention, ffn = sorted(suffixes, key=lambda s: s not in ("attention.output.dense", "attn.c_proj",
                                                             "self_attn.o_proj", "SelfAttention.o"))
    n_ffn = sum(n.endswith(ffn) and not n.endswith(attention) for n in wrapped)
    n_attention = sum(n.endswith(attention) for n in wrapped)
    assert n_ffn == blocks
    assert n_attention == (blocks if placement == "houlsby" else 0)
    assert len(wrapped) == n_ffn + n_attention
    assert not any("EncDecAttention" in n for n in wrapped)


def test_unknown_architecture_error_says_how_to_pass_module_names():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(Tiny(), BottleneckConfig())
    model = get_peft_model(Tiny(), BottleneckConfig(target_modules=["fc"], reduction_factor=2))
    assert isinstance(model.base_model.model.fc, BottleneckLayer)


# --- Compacter ---------------------------------------------------------------------------------------------------
def test_compacter_parameter_count_matches_the_formula_on_t5():
    d, n, rf = 128, 4, 32
    m = d // rf
    per_adapter = 3 * d + 3 * m  # down: d + 2m, up: m + 2d (rank-1 W, bias), rule counted once
    model = get_peft_model(tiny("t5"), CompacterConfig())
    counts = count_trainable(model)
    sites = 2 * 2 + 2 * 2  # encoder (attn, FFN) and decoder (self-attn, FFN) of 2 blocks each
    assert counts["adapter"] == sites * per_adapter + n**3
    # T5 LayerNorms (weight only): 2 per encoder block + final, 3 per decoder block + final
    assert counts["layer_norm"] == (2 * 2 + 1 + 3 * 2 + 1) * d
    assert counts["other"] == 0
    plus = count_trainable(get_peft_model(tiny("t5"), CompacterPlusPlusConfig()))
    assert plus["adapter"] == 4 * per_adapter + n**3


def test_compacter_rule_tensor_is_one_shared_parameter():
    model = get_peft_model(tiny("t5"), CompacterConfig())
    rule = model.base_model.bottleneck_phm_rule["default"]
    rule_params = [name for name, p in model.named_parameters() if p is rule]
    assert rule_params == ["base_model.bottleneck_phm_rule.default"]  # appears once
    assert not any(p.shape == (4, 4, 4) and p is not rule for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(m, BottleneckLayer)]
    assert all(layer.shared_rules.get("default") is rule for layer in layers)
    # every adapter uses it: its gradient collects contributions from all layers
    model.train()
    x = inputs("t5")
    model(input_ids=x["input_ids"], labels=x["decoder_input_ids"].contiguous()).loss.backward()
    assert rule.grad is not None and rule.grad.abs().sum() > 0
    expected = sum(torch.kron(rule[i], layers[0].bottleneck_adapter["default"].down.weights()[i]) for i in range(4))
    torch.testing.assert_close(layers[0].bottleneck_adapter["default"].down.kron_weight(rule), expected)


def test_count_trainable_separates_head_and_layer_norms():
    model = get_peft_model(tiny("bert"), CompacterPlusPlusConfig(task_type="SEQ_CLS", reduction_factor=16))
    counts = count_trainable(model)
    d, m = 64, 4
    assert counts["adapter"] == 2 * (3 * d + 3 * m) + 4**3
    assert counts["layer_norm"] == (1 + 2 * 2) * 2 * d  # embeddings + 2 per layer, weight and bias
    assert counts["other"] == 64 * 3 + 3  # the classifier head (peft's SEQ_CLS modules_to_save)
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- peft behaviour ----------------------------------------------------------------------------------------------
def test_zero_up_init_is_exactly_the_base_model_and_default_init_is_close():
    for arch in ("bert", "gpt2"):
        base = tiny(arch)
        expected = logits(base, arch)
        exact = get_peft_model(base, CompacterConfig(init_weights="zeros_up", reduction_factor=8))
        assert torch.equal(logits(exact, arch), expected)
    base = tiny("llama")
    expected = logits(base, "llama")
    near = get_peft_model(base, CompacterConfig(reduction_factor=8))  # rule ~ N(0, 1e-4): near identity
    torch.testing.assert_close(logits(near, "llama"), expected, rtol=0, atol=1e-3)


CONFIGS = {
    "houlsby": lambda: BottleneckConfig(placement="houlsby", reduction_factor=8, non_linearity="swish"),
    "compacter": lambda: CompacterConfig(reduction_factor=8),
    "compacter++": lambda: CompacterPlusPlusConfig(reduction_factor=8),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_save_load_disable_and_merge_refusal(tmp_path, name, arch):
    base_out = logits(tiny(arch), arch)
    model = get_peft_model(tiny(arch), CONFIGS[name]())
    perturb_adapter(model, scale=0.2, add=True)
    out = logits(model, arch)
    assert not torch.allclose(out, base_out, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(logits(model, arch), base_out)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("phm_rule" in k for k in state) == (0 if name == "houlsby" else 1)
    loaded = PeftModel.from_pretrained(tiny(arch), tmp_path)
    assert torch.equal(logits(loaded, arch), out)
    assert count_trainable(loaded)["total"] == 0  # loaded for inference


def test_multiple_adapters_switch_and_delete():
    arch = "llama"
    base_out = logits(tiny(arch), arch)
    model = get_peft_model(tiny(arch), CompacterConfig(reduction_factor=8), adapter_name="a")
    model.add_adapter("b", CompacterPlusPlusConfig(reduction_factor=8))
    perturb_adapter(model, scale=0.2, seed=4, add=True)
    rules = model.base_model.bottleneck_phm_rule
    assert set(rules) == {"a", "b"} and rules["a"] is not rules["b"]
    assert rules["a"].requires_grad and not rules["b"].requires_grad
    out_a = logits(model, arch)
    model.set_adapter("b")
    assert rules["b"].requires_grad and not rules["a"].requires_grad
    out_b = logits(model, arch)
    assert not torch.allclose(out_a, out_b)
    model.delete_adapter("a")
    assert set(rules) == {"b"}
    assert torch.equal(logits(model, arch), out_b)
    with model.disable_adapter():
        assert torch.equal(logits(model, arch), base_out)


def test_config_validation():
    with pytest.raises(ValueError, match="placement"):
        BottleneckConfig(placement="middle")
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="nope")
    with pytest.raises(ValueError, match="divisible"):  # bert hidden 64 / rf 32 = 2 bottleneck units, n = 4
        get_peft_model(tiny("bert"), CompacterConfig())


@pytest.mark.parametrize("config_cls", [CompacterConfig, CompacterPlusPlusConfig])
def test_loading_onto_a_different_base_names_the_layer(config_cls, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(width):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=width, n_layer=2, n_head=4, n_positions=32))

    get_peft_model(gpt2(128), config_cls()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"different base model.*transformer\.h\.0\..*shape"):
        PeftModel.from_pretrained(gpt2(256), tmp_path)
