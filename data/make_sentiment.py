"""Generate leantune's shipped text-classification set: compositional product-review sentiment.

Every sentence is built here from small word lists (written for this repository, Apache-2.0), so the data
has no third-party licence. The labels need more than word spotting, which is what makes it a useful
fine-tuning test for a sentence-embedding model:

* negation flips a clause (``"the battery was not reliable"`` is negative);
* in ``"A, but B"`` / ``"although A, B"`` the clause B decides the label;
* hedges (``"hardly"``, ``"far from"``) negate; intensifiers (``"really"``) do not;
* some sentences carry a distracting neutral clause.

Run ``python data/make_sentiment.py`` to regenerate ``data/sentiment/{train,test}.jsonl`` (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = [
    "great", "excellent", "reliable", "sturdy", "delightful", "superb", "comfortable", "impressive", "solid",
    "wonderful", "pleasant", "fantastic", "responsive", "elegant", "useful", "fast", "quiet", "bright",
    "generous", "charming", "flawless", "intuitive", "durable", "smooth", "accurate", "friendly", "helpful",
    "lovely", "stunning", "brilliant",
]
NEGATIVE = [
    "terrible", "awful", "flimsy", "unreliable", "disappointing", "broken", "noisy", "slow", "clumsy",
    "dreadful", "cheap", "annoying", "confusing", "fragile", "useless", "sluggish", "dim", "rude", "poor",
    "mediocre", "faulty", "painful", "ugly", "buggy", "inaccurate", "unhelpful", "overpriced", "weak",
    "frustrating", "horrible",
]
ASPECTS = [
    "battery", "screen", "keyboard", "delivery", "customer service", "camera", "speaker", "price", "design",
    "charger", "manual", "app", "packaging", "sound", "hinge", "fan", "display", "warranty", "setup",
    "software", "strap", "lens", "case", "remote", "cable",
]
NEUTRAL = [
    "I bought it last month", "it arrived on a Tuesday", "my brother recommended it", "it comes in blue",
    "I use it at work", "the box was square", "I ordered two of them", "it replaced my old one",
]
NEGATORS = ["not", "hardly", "far from", "never", "not at all"]
INTENSIFIERS = ["", "", "really ", "very ", "quite ", "truly "]


def clause(rng: random.Random) -> tuple[str, int]:
    """One ``"the <aspect> was <adj>"`` clause and its polarity (1 positive, 0 negative)."""
    aspect = rng.choice(ASPECTS)
    positive = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    if rng.random() < 0.35:
        neg = rng.choice(NEGATORS)
        if neg == "not at all":
            text = f"the {aspect} was not {adj} at all"
        else:
            text = f"the {aspect} was {neg} {adj}"
        return text, int(not positive)
    return f"the {aspect} was {rng.choice(INTENSIFIERS)}{adj}", int(positive)


def sentence(rng: random.Random) -> tuple[str, int]:
    kind = rng.random()
    first, label_first = clause(rng)
    if kind < 0.35:
        text, label = first, label_first
    else:
        second, label_second = clause(rng)
        if kind < 0.7:
            text, label = f"{first}, but {second}", label_second
        elif kind < 0.85:
            text, label = f"although {first}, {second}", label_second
        else:
            text, label = f"{first} even though {second}", label_first
    if rng.random() < 0.25:
        text = f"{rng.choice(NEUTRAL)}; {text}"
    return text[0].upper() + text[1:] + ".", label


def generate(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        text, label = sentence(rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": label})
    return rows


def main() -> None:
    out = Path(__file__).resolve().parent / "sentiment"
    out.mkdir(exist_ok=True)
    everything = generate(4000, seed=2024)
    splits = {"train": everything[:3000], "test": everything[3000:]}
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{name}: {len(rows)} rows, {sum(r['label'] for r in rows)} positive")


if __name__ == "__main__":
    main()
