"""Tiny Hugging Face models built from configs, and how to put each leantune adapter on them."""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import leantune.adapters as la

ARCHS = ("llama", "gpt2", "bert")
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value", "output.dense"],
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        model = GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, num_labels=3)
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def batch_for(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    labels = torch.randint(0, 3, (2,), generator=g) if arch == "bert" else ids
    return {"input_ids": ids, "labels": labels}


def make_config(method: str, arch: str, **overrides):
    targets = TARGETS[arch]
    extra = {"task_type": "SEQ_CLS"} if arch == "bert" else {}
    extra.update(overrides)
    if method == "lora_xs":
        return la.LoraXSConfig(r=4, target_modules=targets, **extra)
    if method == "lora_sb":
        return la.LoraSBConfig(r=4, target_modules=targets, **extra)
    if method == "allora":
        return la.ALLoRAConfig(r=4, target_modules=targets, **extra)
    if method == "dylora":
        return la.DyLoRAConfig(r=4, target_modules=targets, **extra)
    if method == "nola":
        return la.NolaConfig(r=4, num_basis_A=16, num_basis_B=16, target_modules=targets, **extra)
    raise ValueError(method)


def adapt(model, method: str, arch: str, adapter_name: str = "default", **overrides):
    """A PeftModel with a leantune adapter of ``method``; LoRA-SB gets its gradient initialisation."""
    config = make_config(method, arch, **overrides)
    if method == "lora_sb":
        return la.get_lora_sb_model(model, config, [batch_for(arch, 5)], lr=1e-3, adapter_name=adapter_name,
                                    progress=False)
    return get_peft_model(model, config, adapter_name=adapter_name)


def perturb_adapter(peft_model, scale: float = 0.1, seed: int = 3, add: bool = False) -> None:
    """Give every trainable adapter tensor random values (``add``: add noise to its init) so it is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * scale
                p.add_(noise) if add else p.copy_(noise)
