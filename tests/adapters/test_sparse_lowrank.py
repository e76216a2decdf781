"""SLTrain and LOST: the paper's parameter counts, forward/backward against the dense formula in float64, the sparse
part's storage, save/load, merge to a plain linear, bf16, the low-rank optimizers per layer, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import leantune
from leantune.adapters.sparse_lowrank import SparseLowRankLayer


class Net(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(24, 40, bias=bias)
        self.down = nn.Linear(40, 12, bias=bias)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _model(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(Net().to(dtype), config)


CONFIGS = {
    "sltrain": lambda: leantune.SLTrainConfig(r=4, lora_alpha=8, sparsity=0.1, target_modules=["up", "down"],
                                              init_weights=False),
    "lost-in": lambda: leantune.LostConfig(r=4, channel_ratio=0.25, target_modules=["up", "down"]),
    "lost-out": lambda: leantune.LostConfig(r=4, channel_ratio=0.25, sparse_channels="out",
                                            target_modules=["up", "down"]),
}


def _dense(layer: SparseLowRankLayer) -> tuple[torch.Tensor, ...]:
    """W = s·B A + S by hand (S scattered from values and index), in the layer's dtype."""
    B, A, values, index = (t.detach().clone().requires_grad_(t.is_floating_point()) for t in layer._parts("default"))
    S = torch.zeros(layer.out_features, layer.in_features, dtype=B.dtype)
    dim = layer.sparse_dim["default"]
    if dim < 0:
        S = S.view(-1).index_copy(0, index.long(), values).view_as(S)
    else:
        S = S.index_copy(dim, index.long(), values)
    return layer.scaling["default"] * B @ A + S, (B, A, values)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_the_dense_formula(name):
    model = _model(CONFIGS[name]())
    layer = model.base_model.model.up
    x = torch.randn(5, 3, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    W, (B, A, values) = _dense(layer)
    bias = layer._bias("default").detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, W, bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(layer._parts("default")[:3], (B, A, values)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer._bias("default").grad, bias.grad, rtol=1e-12, atol=1e-12)
    assert layer.base_layer.weight.numel() == 0  # the dense weight was replaced, not kept


def test_lost_init_is_svd_plus_strongest_residual_channels():
    config = leantune.LostConfig(r=4, channel_ratio=0.25, target_modules=["up"])
    model = _model(config, dtype=torch.float32)
    layer = model.base_model.model.up
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + sum(map(ord, "up")))
    W0 = torch.empty(40, 24)
    nn.init.kaiming_uniform_(W0, a=math.sqrt(5), generator=gen)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    low = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    B, A, values, index = layer._parts("default")
    torch.testing.assert_close(B @ A, low, rtol=1e-5, atol=1e-6)
    E = W0 - low
    expected = torch.sort(torch.topk(E.norm(dim=0), 6).indices).values  # ⌊0.25·24⌋ strongest input channels
    assert index.tolist() == expected.tolist() and index.dtype == torch.int32
    W = layer.get_delta_weight("default").detach()
    torch.testing.assert_close(W[:, expected], W0[:, expected], rtol=1e-5, atol=1e-6)  # kept channels: W0 exactly


def test_parameter_counts_equal_the_paper_60m():
    """SLTrain on LLaMA-60M (d 512, ffn 1376, 8 layers, vocab 32000, untied head), r 128, δ 0.03: spec table
    (computed from the paper's configs): full 58.07M, SLTrain 43.53M of which 0.76M sparse."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        full = sum(p.numel() for p in T.LlamaForCausalLM(config).parameters())
    assert round(full / 1e6, 2) == 58.07
    model = T.LlamaForCausalLM(config)
    peft_model = get_peft_model(model, leantune.SLTrainConfig(r=128, lora_alpha=32, sparsity=0.03, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    layers = [m for m in peft_model.modules() if isinstance(m, SparseLowRankLayer)]
    sparse = sum(m.part("values")["default"].numel() for m in layers)
    total = sum(p.numel() for n, p in peft_model.base_model.model.named_parameters())
    assert round(sparse / 1e6, 2) == 0.76
    assert round(total / 1e6, 2) == 43.53
    index_bytes = sum(m.part("index")["default"].numel() * 4 for m in layers)
    assert sum(m.sparse_bytes() for m in layers) == sparse * 4 + index_bytes  # values + int32 indices, no mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_and_merge(name, tmp_path):
    model = _model(CONFIGS[name](), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 24)
    expected = model(x)
    model.save_pretrained(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert any(k.endswith("index") and v.dtype == torch.int32 for k, v in saved.items())
    torch.manual_seed(123)  # another base init: the replaced weights must not matter, the support comes from the file
    loaded = PeftModel.from_pretrained(Net(), tmp_path / "a")
    torch.testing.assert_close(loaded(x), expected)
    merged = loaded.merge_and_unload()
    assert type(merged.up) is nn.Linear and merged.up.weight.shape == (40, 24)
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)


def test_bf16_matches_fp32():
    ref = _model(CONFIGS["sltrain"](), dtype=torch.float32)
    low = _model(CONFIGS["sltrain"](), dtype=torch.bfloat16)
    x = torch.randn(8, 24)
    torch.testing.assert_close(low(x.bfloat16()).float(), ref(x), rtol=5e-2, atol=5e-2)
    low(x.bfloat16()).float().square().sum().backward()
    # the factors are fp32 (peft's autocast_adapter_dtype) under a bf16 model, and get gradients of their dtype
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in low.parameters() if p.requires_grad)


@pytest.mark.parametrize("layerwise", [False, True])
def test_low_rank_optimizer_trains_it(layerwise):
    model = _model(leantune.SLTrainConfig(r=8, sparsity=0.1, target_modules=["up", "down"], train_dense_modules=True),
                   dtype=torch.float32)
    opt = leantune.optim.build_optimizer(model, leantune.optim.OptimizerConfig("galore_adamw", rank=4, lr=1e-2,
                                                                               layerwise=layerwise))
    x, y = torch.randn(64, 24), torch.randn(64, 12)
    losses = []
    for _ in range(60):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert projected and all(p.ndim == 2 for p in projected)


def test_refusals():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    with pytest.raises(TypeError, match="replaces plain nn.Linear"):
        get_peft_model(gpt2, leantune.SLTrainConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        _model(leantune.SLTrainConfig(r=20, target_modules=["down"]))
    for bad in (0, 1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="sparsity"):
            leantune.SLTrainConfig(sparsity=bad)
    with pytest.raises(ValueError, match="sparsity is SLTrain's"):
        leantune.LostConfig(sparsity=0.1)
    with pytest.raises(ValueError, match="channel_ratio"):
        leantune.LostConfig(channel_ratio=1.0)
    model = _model(CONFIGS["sltrain"]())
    with pytest.raises(ValueError, match="one such adapter"):
        model.add_adapter("other", CONFIGS["sltrain"]())
    with pytest.raises(RuntimeError, match="cannot be undone"):
        layer = model.base_model.model.up
        layer.merge()
        layer.unmerge()


@pytest.mark.parametrize("kind", ["sltrain", "lost"])
def test_train_dense_modules_trains_and_saves_embeddings_norms_and_head(tmp_path, kind):
    """Pretraining from scratch: with train_dense_modules every module the tuner does not replace trains too (a
    regression: the list reached peft after it had made its modules trainable, so they stayed frozen and a
    from-scratch run could not learn its embeddings), and the adapter folder carries them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))

    extra = {"channel_ratio": 0.25} if kind == "lost" else {}
    cls = leantune.SLTrainConfig if kind == "sltrain" else leantune.LostConfig
    model = get_peft_model(llama(), cls(r=4, target_modules=["q_proj", "up_proj"], train_dense_modules=True,
                                        **extra))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for part in ("embed_tokens", "lm_head", "input_layernorm", "model.norm", "k_proj", "down_proj"):
        assert any(part in n for n in trainable), (part, sorted(trainable))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 32, (2, 8))
    before = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(model.base_model.model.lm_head.modules_to_save["default"].weight, before)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
