"""Tiny models of every supported family, with randomised norm affines so folding is not a no-op."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

VOCAB = 64


def _randomize_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            lname = name.lower()
            if "norm" in lname or "ln_" in lname:
                if name.endswith("weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.uniform_(-0.3, 0.3)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
        model = T.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
        model = T.Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
        model = T.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=VOCAB, num_labels=2, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        model = T.BertForSequenceClassification(cfg)
    elif family == "t5":
        cfg = T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, dropout_rate=0.0,
                         feed_forward_proj="gated-gelu", decoder_start_token_id=0)
        model = T.T5ForConditionalGeneration(cfg)
    elif family == "vit":
        cfg = T.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=16, patch_size=8, num_labels=3, attention_probs_dropout_prob=0.0,
                          hidden_dropout_prob=0.0)
        model = T.ViTForImageClassification(cfg)
    else:
        raise ValueError(family)
    _randomize_norms(model)
    for module in model.modules():  # deterministic forward for bit-identity checks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def batch_for(family: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2])}
    ids = torch.randint(1, VOCAB, (2, 8), generator=g)
    if family == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (2, 8), generator=g)}


LN_FAMILIES = {"gpt2", "bert", "vit"}


def with_lora(model: torch.nn.Module, dropout: float = 0.0, trained: bool | None = None, **kwargs) -> torch.nn.Module:
    """peft LoRA on all linears. ``trained``: non-zero B (default: only for RMSNorm families, because folding a
    LayerNorm's β cannot keep an already-trained adapter's constant term s·B·A·β; fresh adapters have B = 0)."""
    if trained is None:
        trained = model.config.model_type not in LN_FAMILIES
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  lora_dropout=dropout, **kwargs))
    torch.manual_seed(3)
    if not trained:
        return peft_model
    with torch.no_grad():  # non-zero B so the adapters actually contribute
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


FAMILIES = ["llama", "qwen2", "gpt2", "bert", "t5", "vit"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
