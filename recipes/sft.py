"""Instruction SFT of a causal LM: 4/8-bit bitsandbytes base + a leantune adapter + memory options, on Trainer.

    python recipes/sft.py --model PATH/TO/causal-lm [--quant 4bit] [--adapter allora] [--packing] [--steps 200]
    python recipes/sft.py                      # no --model: a small Llama built from a config (see below)

* data: instruction/answer pairs made from the shipped review sentences (``data/sentiment``, Apache-2.0): "Is this
  review positive or negative?" and "Repeat the review with its words in reverse order.", rendered with the
  tokenizer's chat template (a minimal one is set when the tokenizer has none);
* loss on answers only: prompt tokens get label -100;
* ``--packing``: examples of a batch are concatenated into one row with per-example ``position_ids``
  (``transformers.DataCollatorWithFlattening``), which transformers turns into a block-diagonal attention mask —
  nothing is padded and no example attends to another; without it, rows are padded (labels -100);
* the base is loaded in 4-bit NF4 or 8-bit (bitsandbytes; runs on the CPU too), the adapter and
  ``leantune.memory`` are switched on by ``LeanTuneCallback``, gradient checkpointing is non-reentrant;
* afterwards: ``leantune export --to lora`` (a plain peft LoRA a serving engine loads) for LoRA-family adapters,
  and ``leantune merge`` onto the unquantized base (full HF folder).

No pretrained causal LM is available offline on the CI machine, so without ``--model`` the recipe builds a small
Llama from a config (random weights, MiniLM's WordPiece tokenizer) and saves it as the base: the loss falls, the
model learns the two tasks' format, but it is a smoke test, not a useful model. Give ``--model`` for real work.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.common import SENTIMENT_DIR, minilm_path  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}### User:\n{{ m['content'] }}\n"
                 "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}### Assistant:\n{% endif %}")
ADAPTERS = {
    "lora": lambda r: __import__("peft").LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"),
    "allora": lambda r: __import__("leantune").ALLoRAConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM"),
    "lora_xs": lambda r: __import__("leantune").LoraXSConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM"),
    "dylora": lambda r: __import__("leantune").DyLoRAConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM"),
}
DEFAULT_LR = {"lora": 2e-3, "allora": 2e-3, "lora_xs": 1e-2, "dylora": 2e-3}


def instruction_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (instruction, answer) pairs from the shipped review sentences."""
    rows = [json.loads(line) for line in (SENTIMENT_DIR / "train.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    pairs = []
    for i, row in enumerate(rows[:n]):
        if i % 2 == 0:
            pairs.append((f"Is this review positive or negative?\n{row['text']}",
                          "positive" if row["label"] == 1 else "negative"))
        else:
            words = row["text"].rstrip(".").split()
            pairs.append((f"Repeat the review with its words in reverse order.\n{row['text']}", " ".join(words[::-1])))
    return pairs


def tokenize_pair(tokenizer, prompt: str, answer: str, max_length: int) -> dict:
    """Chat-formatted ids with labels -100 on the prompt (loss on the answer only)."""
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][:max_length]
    labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
    return {"input_ids": ids, "labels": labels}


def build_default_base(out: Path) -> Path:
    """A small random Llama with MiniLM's tokenizer, saved as a normal HF folder (the offline stand-in)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_base(path: Path, quant: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = {"4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16),
                    "8bit": BitsAndBytesConfig(load_in_8bit=True), "none": None}[quant]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization,
                                                device_map=device)


@torch.no_grad()
def answer_loss(model, rows: list[dict]) -> float:
    """Mean loss on the answer tokens of ``rows`` (one at a time: no padding effects)."""
    model.eval()
    device = next(model.parameters()).device
    losses = [model(input_ids=torch.tensor([r["input_ids"]], device=device),
                    labels=torch.tensor([r["labels"]], device=device)).loss.float().item() for r in rows]
    model.train()
    return sum(losses) / len(losses)


def _checkpointing_args(training_arguments) -> dict:
    """Non-reentrant checkpointing under transformers' current argument names (``gradient_*`` before 5.x)."""
    prefix = "activation" if "activation_checkpointing" in training_arguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def run_cli(*args: str) -> None:
    exe = shutil.which("leantune") or str(Path(sys.executable).with_name("leantune"))
    print(f"$ leantune {' '.join(args)}")
    subprocess.run([exe, *args], check=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF causal-LM folder (default: a small Llama, see above)")
    parser.add_argument("--quant", choices=["4bit", "8bit", "none"], default="4bit")
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), default="allora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--packing", action="store_true", help="concatenate examples (no padding)")
    parser.add_argument("--no-memory", action="store_true", help="without leantune.memory")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--out", default="runs/sft")
    args = parser.parse_args(argv)

    import datasets
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer,
                              TrainingArguments)

    import leantune
    from leantune.memory import MemoryConfig

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    base_dir = Path(args.model) if args.model else build_default_base(out / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    pairs = instruction_pairs(args.examples + 100)
    rows = [tokenize_pair(tokenizer, p, a, args.max_length) for p, a in pairs]
    train, held_out = datasets.Dataset.from_list(rows[:args.examples]), rows[args.examples:]

    model = load_base(base_dir, args.quant)
    before = answer_loss(model, held_out[:40])
    collator = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if args.packing else
                DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    callback = leantune.LeanTuneCallback(adapter=ADAPTERS[args.adapter](args.rank),
                                         memory=None if args.no_memory else MemoryConfig())
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr or DEFAULT_LR[args.adapter], warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="linear", logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
        **_checkpointing_args(TrainingArguments),
        remove_unused_columns=False, seed=0, use_cpu=not torch.cuda.is_available(),
    )
    if args.quant != "none":  # Trainer refuses a quantized model without adapters: attach them first
        model = callback.prepare(model)
    trainer = callback.setup(Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    adapted = trainer.model
    after = answer_loss(adapted, held_out[:40])
    adapted.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")

    print(f"\n## SFT: {args.adapter} r={args.rank} on a {args.quant} base, packing={'on' if args.packing else 'off'}\n")
    print("| what | value |\n|---|---|")
    print(f"| answer-token loss before | {before:.3f} |\n| answer-token loss after {args.steps} steps | {after:.3f} |")
    print(f"| trainable parameters | {sum(p.numel() for p in adapted.parameters() if p.requires_grad):,} |")
    print(f"| training wall time | {wall:.1f} s |")
    run_cli("merge", "--base", str(base_dir), "--adapter", str(out / "adapter"), "--out", str(out / "merged"))
    if args.adapter in ("lora", "allora", "lora_xs", "dylora"):
        run_cli("export", str(out / "adapter"), "--to", "lora", str(out / "lora"), "--base", str(base_dir))
    return {"before": before, "after": after, "out": out}


if __name__ == "__main__":
    main()
