"""Train for the model you will serve quantized: accuracy of the *served 4-bit* model after fine-tuning the real
pretrained MiniLM on real text (the quality benchmark's Shakespeare genre task), per training path.

Every path ends in a model whose encoder linears are 4-bit (the classification head stays in full precision, as an
LM head would); what differs is how the adapter meets the quantizer:

* **QLoRA → merge → requantize** (today's path): LoRA r=8 trained on the NF4 base, merged into the dequantized base,
  the merged weights quantized again to NF4 for serving;
* **QLoRA + LoftQ init** (``leantune.adapters.loftq``, 5 alternations): the same, starting from Q_T + L_T R_T;
* **L4Q** (``leantune.L4QConfig``, r=8, int4, groups of 64, LSQ+ init): LoRA inside the learned-step quantizer; the
  served model is its exported int4 model, whose logits equal the training forward bit for bit (tested), so its
  accuracy is measured on that forward;
* **QuZO** (``leantune.optim.QuZO``, 4-bit perturbations): the QLoRA adapter trained with forward passes only, then
  merged and requantized as QLoRA;
* **torchao QAT + LoRA** (torchao's ``QATConfig(IntxWeightOnlyConfig(int4, PerGroup(64)))``: symmetric int4 fake
  quantization of the frozen W0, peft LoRA beside it — torchtune's QATLoRALinear arrangement, spec §6), then
  ``merge_and_unload`` and torchao's ``convert`` step: the served model is torchao's int4 model (symmetric: its
  ``convert`` is exact, the asymmetric one is not, spec §6), evaluated as torchao computes it;
* references: the NF4-quantized base with only the head trained is *not* run; **LoRA on the fp32 base, served fp32**
  (no quantization anywhere) and **LoRA on the fp32 base → merge → NF4** (post-training quantization).

The NF4 base is simulated by bitsandbytes' own NF4 round trip of each weight (``bitsandbytes.functional``, block 64),
i.e. the weights a ``Linear4bit`` computes with. Same data, steps, batch and schedule for every path; 3 seeds;
test accuracy of the served model as mean ± std, training memory (parameters + gradients + AdamW state of the trained
tensors + activations saved for backward of one step) and median step time.

    python benchmarks/quantized_served.py            # ~26 min on 2 CPU cores
    python benchmarks/quantized_served.py --quick    # a smoke run

Prints a markdown table; writes benchmarks/results/quantized_served.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results"

import quality  # noqa: E402  (the quality benchmark's data, batches and accuracy)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

import leantune  # noqa: E402
from leantune.adapters.loftq import loftq_init, nf4_roundtrip  # noqa: E402
from leantune.optim import QuZO  # noqa: E402
from recipes.common import load_minilm_classifier  # noqa: E402

PATHS = ["LoRA, fp32 base, served fp32 (reference)", "LoRA, fp32 base → merge → NF4 (PTQ)",
         "QLoRA → merge → requantize NF4", "QLoRA + LoftQ init → merge → requantize NF4", "L4Q (int4, g=64)",
         "QuZO on the NF4 base → merge → requantize NF4", "torchao QAT + LoRA (int4 sym, g=64) → merge → convert"]
LR = {"QuZO on the NF4 base → merge → requantize NF4": 1e-3}
DEFAULT_LR = 5e-4


def encoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n}


@torch.no_grad()
def quantize_nf4(model: torch.nn.Module) -> None:
    for linear in encoder_linears(model).values():
        linear.weight.copy_(nf4_roundtrip(linear.weight))


def torchao_qat(step: str):
    """torchao's QAT step ``"prepare"`` / ``"convert"`` for the encoder linears (symmetric int4, groups of 64)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_  # local: optional, this path only
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig

    def apply(model: torch.nn.Module) -> torch.nn.Module:
        names = set(encoder_linears(model))
        quantize_(model, QATConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)), step=step),
                  filter_fn=lambda module, fqn: fqn in names)
        return model

    return apply


def build(path: str, seed: int) -> torch.nn.Module:
    model, _ = load_minilm_classifier(num_labels=3, seed=seed)
    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=quality.LINEAR_TARGETS, lora_dropout=0.0, task_type="SEQ_CLS")
    if path.startswith("torchao QAT"):  # fake-quantized W0 (FakeQuantizedLinear is an nn.Linear: peft wraps it)
        return get_peft_model(torchao_qat("prepare")(model), lora)
    if path.startswith("L4Q"):
        return get_peft_model(model, leantune.L4QConfig(r=8, lora_alpha=16, group_size=64,
                                                        target_modules=quality.LINEAR_TARGETS, task_type="SEQ_CLS"))
    if "LoftQ" in path:
        model = get_peft_model(model, lora)
        loftq_init(model, quant_type="nf4", iters=5, progress=False)  # the base becomes Q_T (on the NF4 grid)
        return model
    if "QLoRA" in path or "QuZO" in path:
        quantize_nf4(model)
    return get_peft_model(model, lora)


def served(path: str, model) -> torch.nn.Module:
    """The model that is served: merged and requantized to NF4, except the fp32 reference and L4Q (its forward is
    its exported int4 model)."""
    if path.startswith("L4Q") or "served fp32" in path:
        return model
    merged = model.merge_and_unload()
    if path.startswith("torchao QAT"):
        return torchao_qat("convert")(merged)
    quantize_nf4(merged)
    return merged


def run(path: str, seed: int, data: dict, steps: int, batch: int) -> dict:
    batches = quality.training_batches(data["train"], steps, batch, seed)
    model = build(path, seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    zeroth = "QuZO" in path
    lr = LR.get(path, DEFAULT_LR)
    optimizer = QuZO(params, lr=lr, eps=1e-3, bits=4, seed=seed) if zeroth else torch.optim.AdamW(params, lr=lr)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 16), steps)
    activations = 0 if zeroth else quality.saved_activation_bytes(model, batches[0])
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() * p.element_size() for p in params)
    times = []
    for b in batches:
        start = time.perf_counter()
        if zeroth:
            model.eval()  # both forwards see the same function
            optimizer.step(lambda: model(**b).loss)
        else:
            model(**b).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
        times.append(time.perf_counter() - start)
    serving = served(path, model)
    return {"path": path, "seed": seed, "test_acc": quality.accuracy(serving, data["test"]),
            "train_mem_bytes": param_bytes + (0 if zeroth else 3 * trainable) + activations,
            "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds = 10, 1
    options = argparse.Namespace(train_size=3000 if not args.quick else 200, test_size=1500 if not args.quick else 150,
                                 val_size=None)
    data = quality.load_data(options)
    runs = [run(path, seed, data, args.steps, args.batch) for seed in range(args.seeds) for path in PATHS]
    rows = []
    for path in PATHS:
        mine = [r for r in runs if r["path"] == path]
        accs = [100 * r["test_acc"] for r in mine]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(f"| {path} | {statistics.fmean(accs):.1f} ± {spread:.1f} | "
                    f"{statistics.fmean(r['train_mem_bytes'] for r in mine) / 2**20:.0f} | "
                    f"{1000 * statistics.median(r['step_s'] for r in mine):.0f} |")
    table = ("| training path | served test accuracy % | training memory MiB | step ms |\n|---|---:|---:|---:|\n"
             + "\n".join(rows))
    text = (f"Real MiniLM, Shakespeare genre (3 classes), {args.steps} steps × batch {args.batch}, {args.seeds} "
            f"seed(s); `python benchmarks/quantized_served.py{' --quick' if args.quick else ''}`.\n\n{table}\n")
    print(text)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantized_served.md").write_text(text)
    (RESULTS / "quantized_served.json").write_text(json.dumps(runs, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    means = [statistics.fmean(100 * r["test_acc"] for r in runs if r["path"] == p) for p in PATHS]
    ax.barh(range(len(PATHS)), means)
    ax.set_yticks(range(len(PATHS)), [p.replace(" → ", "→") for p in PATHS], fontsize=7)
    ax.set_xlabel("served test accuracy (%)")
    ax.set_xlim(min(means) - 5, max(means) + 2)
    fig.tight_layout()
    fig.savefig(RESULTS / "quantized_served.png", dpi=120)


if __name__ == "__main__":
    main()
