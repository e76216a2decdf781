"""Adapters trained on a folded model load on the user's original, unfolded base model (peft LoRA, end to end)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import leantune.memory as lm

from .conftest import batch_for, build, with_lora


def test_unfold_delta_formula():
    torch.manual_seed(0)
    gamma, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    delta_folded = torch.randn(4, 6, dtype=torch.float64)
    dw, db = lm.unfold_delta(delta_folded, gamma, beta)
    u = torch.randn(3, 6, dtype=torch.float64)  # original norm output γ ⊙ ŷ + β
    y_hat = (u - beta) / gamma
    torch.testing.assert_close(u @ dw.t() + db, y_hat @ delta_folded.t())
    with pytest.raises(ValueError, match="γ"):
        lm.unfold_delta(delta_folded, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_trained_adapter_exports_to_original_base(family, tmp_path):
    original = build(family)
    model = with_lora(copy.deepcopy(original))
    handle = lm.apply(model, lm.MemoryConfig.exact())
    assert handle.fold_records
    batch = batch_for(family)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    lm.save_unfolded_adapter(model, str(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained, atol=5e-5, rtol=1e-4)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, trained, atol=5e-5, rtol=1e-4)
    # the adapter keeps its own parameterisation while folded: a plain LoRA (no lora_B bias for LayerNorm β)
    assert not any("lora_B" in k and k.endswith("bias") for k in load_file(str(tmp_path / "adapter_model.safetensors")))
