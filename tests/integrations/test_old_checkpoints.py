"""Adapter folders and optimizer checkpoints written by leantune's previous round (commit 27970aa, before the
restructuring into spec tables, hooks and update-rule twins) still load and give the same model
(``tests/fixtures/make_round2.py`` wrote them with that code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import leantune
from leantune.optim import OptimizerConfig, build_optimizer, load_optimizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "round2"
TOKENS = torch.arange(24).reshape(2, 12) % 64
OPTIMIZER = {"lora": "fira_adamw", "lora_xs": "galore_adamw", "allora": "galore_adamw8bit", "dylora": "dct_adamw"}


@pytest.mark.parametrize("name", ["lora", "lora_xs", "allora", "dylora", "nola", "compacter"])
def test_adapter_folder_of_round2_loads_to_the_same_model(name):
    expected = load_file(FIXTURES / "expected_logits.safetensors")[name]
    base = LlamaForCausalLM.from_pretrained(FIXTURES / "base")
    model = leantune.load_adapter(base, FIXTURES / name).eval()
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6), float((logits - expected).abs().max())


@pytest.mark.parametrize("name", sorted(OPTIMIZER))
def test_optimizer_checkpoint_of_round2_resumes(name):
    base = LlamaForCausalLM.from_pretrained(FIXTURES / "base")
    model = PeftModel.from_pretrained(base, FIXTURES / name, is_trainable=True)
    opt = build_optimizer(model, OptimizerConfig(OPTIMIZER[name], rank=2, update_proj_gap=1, lr=1e-2))
    saved = torch.load(FIXTURES / f"{name}.optimizer.pt", weights_only=True)
    load_optimizer(opt, FIXTURES / f"{name}.optimizer.pt")
    state = opt.state_dict()["state"]
    assert sorted(state) == sorted(saved["state"])
    for pid, entries in saved["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(state[pid][key], value), (pid, key)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    opt.step()  # continues from the loaded state
    assert any(not torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
