"""Folding a norm into the linears after it keeps every adapter's function exactly — trained adapters of every type,
on Llama (RMSNorm), GPT-2 and BERT (LayerNorm with β ≠ 0) — in the forward, the gradients, on undo and in what is
saved; also through LeanTuneCallback(memory=True) and for an adapter loaded before apply."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import leantune
import leantune.memory as lm
from tests.adapters.models import perturb_adapter

from .conftest import batch_for, build

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"],
           "gpt2": ["c_attn", "c_fc", "c_proj"], "bert": ["query", "key", "value", "intermediate.dense", "dense"]}
ADAPTERS = {
    "lora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t),
    "lora_xs": lambda t: leantune.LoraXSConfig(r=4, target_modules=t),
    "lora_sb": lambda t: leantune.LoraSBConfig(r=4, target_modules=t, init_weights=False),
    "allora": lambda t: leantune.ALLoRAConfig(r=4, target_modules=t),
    "dylora": lambda t: leantune.DyLoRAConfig(r=4, target_modules=t),
    "nola": lambda t: leantune.NolaConfig(r=4, num_basis_A=16, num_basis_B=16, target_modules=t),
}


def _trained(family, method):
    model = get_peft_model(build(family), ADAPTERS[method](TARGETS[family]))
    perturb_adapter(model, 0.1, add=True)  # a trained adapter: B ≠ 0, so its s·B·A·β term matters
    return model


def _step(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", sorted(ADAPTERS))
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_folding_keeps_every_adapter_exact(family, method, tmp_path):
    model = _trained(family, method)
    if method == "dylora":  # one fixed rank, so both runs use the same factors
        for layer in (m for m in model.modules() if hasattr(m, "sampled_rank")):
            layer.frozen["default"] = False
        model.base_model.sample_rank = lambda: {}
    batch = batch_for(family)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_out, ref_grads = _step(model, batch)
    handle = lm.apply(model, lm.MemoryConfig.exact())
    assert handle.counts["ms_norms"] > 0, str(handle)
    out, grads = _step(model, batch)
    torch.testing.assert_close(out, ref_out, atol=3e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # the adapters keep their parameterisation: every gradient is the eager one
        torch.testing.assert_close(grads[name], ref_grads[name], atol=3e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)  # written while folded ...
    loaded = PeftModel.from_pretrained(build(family), str(tmp_path)).eval()  # ... loads on the original base
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=3e-5, rtol=1e-5)
    handle.undo()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n


def test_adapter_loaded_before_apply_keeps_its_outputs(tmp_path):
    trained = _trained("gpt2", "allora")
    trained.save_pretrained(tmp_path)
    batch = batch_for("gpt2")
    model = PeftModel.from_pretrained(build("gpt2"), str(tmp_path), is_trainable=True)
    reference = model(**batch).logits.detach()
    lm.apply(model, lm.MemoryConfig())
    torch.testing.assert_close(model(**batch).logits.detach(), reference, atol=3e-5, rtol=1e-5)


def test_callback_with_memory_keeps_the_adapters_forward(tmp_path):
    from transformers import Trainer, TrainingArguments

    from leantune.patching import restore_all
    from tests.integrations.test_callback import toy_dataset

    model = build("bert")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-2)
    callback = leantune.LeanTuneCallback(adapter=leantune.LoraXSConfig(r=4, target_modules=["query", "value",
                                                                                               "intermediate.dense"],
                                                                         task_type="SEQ_CLS"),
                                         memory=True, verbose=False)
    trainer = callback.setup(Trainer(model=model, args=args, train_dataset=toy_dataset()))
    trainer.train()
    batch = {"input_ids": torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(3))}
    trainer.model.eval()
    with torch.no_grad():
        patched = trainer.model(**batch).logits
        restore_all(trainer.model)
        plain = trainer.model(**batch).logits
    torch.testing.assert_close(patched, plain, atol=3e-5, rtol=1e-5)
