"""The support matrix: adapter × memory × kernels × optimizer × dtype × architecture, each cell run the way a user runs
it — ``LeanTuneCallback(...).setup(Trainer(...))`` — and checked:

1. the callback either sets up, or refuses at setup with a named reason (``Refused``); nothing fails later;
2. a few steps train and the loss goes down (the training set's loss before and after, in eval mode);
3. ``resume_from_checkpoint`` from the middle continues bit-exactly to the same trainable weights;
4. the forward of the patched model equals the same model with every leantune patch undone (memory options and
   kernels change what is saved and how it is computed, never the forward);
5. merge (``leantune merge``) and export to plain LoRA give the trained model's outputs, for adapters that merge;
   for L4Q, merge and the quantized export (``leantune export --to quantized``, torchao int weights) do.

Used by ``tests/integrations/test_support_matrix.py`` (a pairwise covering array) and
``benchmarks/support_matrix.py`` (writes the support-matrix page).
"""

from __future__ import annotations

import copy
import itertools
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import peft
import torch
import transformers as T
from peft import PeftModel

import leantune
from leantune.integrations.interop import export_to_lora, merge_to_directory
from leantune.integrations.quantized_export import export_quantized, torchao_version
from leantune.memory import MemoryConfig
from leantune.optim import OPTIMIZERS, OptimizerConfig, QuZOConfig
from leantune.patching import restore_all

FACTORS: dict[str, list[str]] = {
    "adapter": ["peft LoRA", "LoRA-XS", "LoRA-SB", "ALLoRA", "DyLoRA", "NOLA", "Bottleneck", "Compacter",
                "Compacter++", "SLTrain", "LOST", "L4Q"],
    "memory": ["off", "ms_norms", "approx_activations", "fused_gated_mlp", "velora", "chunked_loss", "all",
               "budget"],
    "kernels": ["off", "on"],
    # torch's AdamW, every entry of the optimizer spec table, and two modes of GaLore
    "optimizer": ["adamw", *OPTIMIZERS, "galore_adamw/layerwise", "galore_adamw/reset", "quzo"],
    "dtype": ["fp32", "bf16"],
    "arch": ["llama", "gpt2", "bert", "t5"],
}
MERGEABLE = {"peft LoRA", "LoRA-XS", "LoRA-SB", "ALLoRA", "DyLoRA", "NOLA"}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
LR = {"LoRA-XS": 3e-2, "NOLA": 3e-2}  # r² / k + l parameters move slowly; the rest (LoRA-SB starts moved) 1e-2
OPTIMIZER_LR = {"apollo_mini": 0.1,  # APOLLO-Mini multiplies the step by √128 ≈ 11 (its recipe's lr is that much lower)
                "conda_adamw": 0.3,  # Conda's normalized step in a rotated full basis moves every entry of the weight:
#                                      at 1e-2, 4 bf16 steps of DyLoRA on GPT-2 overshoot (loss 4.177 -> 4.182)
                "quzo": 0.1}  # a zeroth-order step moves along a whole random direction (norm ~√d): at 1e-2 a bf16
#                               T5's adapter grows until merging it in bf16 rounds the logits past the check's 3%


@dataclass
class Cell:
    adapter: str
    memory: str
    kernels: str
    optimizer: str
    dtype: str
    arch: str

    @property
    def key(self) -> str:
        return " | ".join(f"{getattr(self, f)}" for f in FACTORS)


class Refused(Exception):
    """The cell was refused at setup; ``str()`` is the reason leantune gave."""


def pairwise_cells(seed: int = 0) -> list[Cell]:
    """A covering array of strength 2: every pair of values of any two factors appears in at least one cell."""
    names = list(FACTORS)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(range(len(names)), 2)
                 for va in FACTORS[names[a]] for vb in FACTORS[names[b]]}
    rng = random.Random(seed)
    rows: list[tuple[str, ...]] = []
    while uncovered:
        best, best_gain = None, -1
        first = min(uncovered)  # every row covers at least the lexically first uncovered pair
        for _ in range(40):
            row = [rng.choice(FACTORS[n]) for n in names]
            row[first[0]], row[first[2]] = first[1], first[3]
            for i in rng.sample(range(len(names)), len(names)):  # greedy: each factor its best value given the rest
                if i in (first[0], first[2]):
                    continue
                row[i] = max(FACTORS[names[i]], key=lambda v: sum(
                    (min(i, j), row[min(i, j)] if j < i else v, max(i, j), v if j < i else row[max(i, j)])
                    in uncovered for j in range(len(names)) if j != i))
            gain = sum((a, row[a], b, row[b]) in uncovered for a, b in itertools.combinations(range(len(names)), 2))
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(tuple(best))
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(range(len(names)), 2)}
    return [Cell(*row) for row in rows]


# ----------------------------------------------------------------------------------------------- building blocks


def tiny_model(arch: str, dtype: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64)
    if arch == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=False, **common))
    elif arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                               embd_pdrop=0.0, attn_pdrop=0.0, **common))
    elif arch == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, num_labels=2,
                                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                             **common))
    elif arch == "t5":
        model = T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                                        dropout_rate=0.0, decoder_start_token_id=0,
                                                        feed_forward_proj="gated-gelu", **common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # norm affines away from (1, 0): folding is not a no-op
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.3, 0.3)
    return model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)


def dataset(arch: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (8, 8), generator=g)
    if arch == "bert":
        labels = (ids[:, 0] > 32).long().tolist()
    else:
        labels = ids.tolist()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


def adapter_config(name: str, arch: str):
    task = TASK[arch]
    low = dict(r=4, target_modules="all-linear", task_type=task)
    if name == "peft LoRA":
        return peft.LoraConfig(lora_alpha=8, lora_dropout=0.0, **low)
    if name == "LoRA-XS":
        return leantune.LoraXSConfig(**low)
    if name == "LoRA-SB":
        return leantune.LoraSBConfig(num_init_batches=1, **low)
    if name == "ALLoRA":
        return leantune.ALLoRAConfig(**low)
    if name == "DyLoRA":
        return leantune.DyLoRAConfig(**low)
    if name == "NOLA":
        return leantune.NolaConfig(num_basis_A=16, num_basis_B=16, **low)
    if name == "SLTrain":
        return leantune.SLTrainConfig(sparsity=0.1, lora_alpha=8, **low)
    if name == "LOST":
        return leantune.LostConfig(channel_ratio=0.25, **low)
    if name == "L4Q":  # groups of 16 divide every input size of the tiny models (32, 64, 128)
        return leantune.L4QConfig(group_size=16, **{**low, "r": 4})
    bottleneck = dict(reduction_factor=8, task_type=task)
    if name == "Bottleneck":
        return leantune.BottleneckConfig(placement="houlsby", **bottleneck)
    if name == "Compacter":
        return leantune.CompacterConfig(**bottleneck)
    if name == "Compacter++":
        return leantune.CompacterPlusPlusConfig(**bottleneck)
    raise ValueError(name)


def memory_config(name: str):
    if name == "off":
        return None
    if name == "all":
        return MemoryConfig.all()
    if name == "budget":  # the exact techniques and an activation budget of 30% of what they keep
        return MemoryConfig.exact(budget=0.3)
    techniques = ("ms_norms", "approx_activations", "fused_gated_mlp", "velora", "chunked_loss")
    return MemoryConfig(**{t: t == name for t in techniques})


def optimizer_config(name: str):
    if name == "adamw":
        return None
    if name == "quzo":  # zeroth order: two forward passes per step, no backward
        return QuZOConfig(eps=1e-3, bits=4)
    base, _, mode = name.partition("/")
    restarts = {"reset_every": 2, "recovery_steps": 1} if mode == "reset" else {}
    return OptimizerConfig(base, **OPTIMIZERS[base].rank_options(2), update_proj_gap=2, layerwise=mode == "layerwise", **restarts)


def make_trainer(cell: Cell, out: Path) -> T.Trainer:
    """``LeanTuneCallback(...).setup(Trainer(...))`` for ``cell``; raises :class:`Refused` if setup refuses."""
    args = T.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
        learning_rate=LR.get(cell.adapter, 1e-2) * OPTIMIZER_LR.get(cell.optimizer, 1.0),
        lr_scheduler_type="constant", save_strategy="steps", save_steps=2, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, max_grad_norm=1.0,
    )
    try:
        callback = leantune.LeanTuneCallback(
            adapter=adapter_config(cell.adapter, cell.arch), optimizer=optimizer_config(cell.optimizer),
            memory=memory_config(cell.memory), kernels=cell.kernels == "on", verbose=False)
        trainer = T.Trainer(model=tiny_model(cell.arch, cell.dtype), args=args, train_dataset=dataset(cell.arch))
        for printer in (T.trainer_callback.PrinterCallback, T.trainer_callback.ProgressCallback):
            trainer.remove_callback(printer)
        return callback.setup(trainer)
    except (ValueError, TypeError, RuntimeError) as err:
        raise Refused(str(err).splitlines()[0]) from err


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    model.train()
    return out.float()


def _train_loss(trainer) -> float:
    """Mean loss over the training set (both batches), eval mode, no gradient: the same batches before and after."""
    model = trainer.model
    model.eval()
    with torch.no_grad():
        losses = [model(**batch).loss.float() for batch in trainer.get_eval_dataloader(trainer.train_dataset)]
    model.train()
    return float(torch.stack(losses).mean())


def _eval_batch(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids}
    if arch == "t5":
        batch["decoder_input_ids"] = ids[:, :5]
    return batch


def _close(a: torch.Tensor, b: torch.Tensor, dtype: str) -> bool:
    tol = 3e-2 if dtype == "bf16" else 1e-4
    return bool(((a - b).abs().max() <= tol * b.abs().max().clamp_min(1.0)).item())


def _assert_same_function(patched: torch.Tensor, plain: torch.Tensor, model, batch, dtype: str) -> None:
    """The patched forward computes the unpatched model's function. In fp32 they agree to 1e-4. In bf16 a folded
    weight W·diag(γ) rounds differently from W and γ applied one after the other, and through a deep trained model
    the two roundings can drift apart by more than any fixed tolerance (a T5 trained 4 steps with Conda: 0.52 of
    logits up to 3.4); so both are held against the same weights in fp32, and the patched model may be at most
    twice as far from it as the unpatched bf16 model is (plus 1% of the logits' scale)."""
    if dtype != "bf16":
        assert _close(patched, plain, dtype), f"forward differs by {(patched - plain).abs().max():.3g}"
        return
    reference = _logits(copy.deepcopy(model).float(), batch)
    err_patched = float((patched - reference).abs().max())
    err_plain = float((plain - reference).abs().max())
    scale = float(reference.abs().max().clamp_min(1.0))
    assert err_patched <= 2 * err_plain + 1e-2 * scale, (
        f"forward differs: patched bf16 is {err_patched:.3g} from the fp32 reference, unpatched bf16 {err_plain:.3g}")


def run_cell(cell: Cell, tmp: Path) -> dict[str, Any]:
    """Run every check of the module docstring for ``cell``; returns what was checked (raises on a failure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = make_trainer(cell, tmp / "full")
        before, start = _train_loss(full), trainable(full.model)
        full.train()
        losses = [log["loss"] for log in full.state.log_history if "loss" in log]
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
        after = _train_loss(full)
        expected = trainable(full.model)
        if cell.optimizer == "quzo":  # 4 zeroth-order steps along random directions need not lower the loss (and
            # in bf16 the loss cannot show it): the weights move; QuZO's descent is tested on its own (tests/optim)
            assert any(not torch.equal(start[n], expected[n]) for n in start), "QuZO moved no weight"
        else:
            assert after < before, f"loss did not go down: {before:.4f} -> {after:.4f} (steps {losses})"

        resumed = make_trainer(cell, tmp / "full")
        resumed.train(resume_from_checkpoint=str(tmp / "full" / "checkpoint-2"))
        got = trainable(resumed.model)
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), f"resume differs at {name}"

        batch = _eval_batch(cell.arch)
        patched = _logits(full.model, batch)
        restore_all(full.model)
        plain = _logits(full.model, batch)
        _assert_same_function(patched, plain, full.model, batch, cell.dtype)
        checks = {"trains": True, "resume": True, "forward": True, "merge": None}
        if cell.adapter in MERGEABLE:
            base_dir, adapter_dir = tmp / "base", tmp / "adapter"
            tiny_model(cell.arch, cell.dtype).save_pretrained(base_dir)
            full.model.save_pretrained(adapter_dir)
            merged = merge_to_directory(base_dir, adapter_dir, tmp / "merged")
            merged_model = getattr(T, type(full.model.get_base_model()).__name__).from_pretrained(
                merged, dtype=torch.bfloat16 if cell.dtype == "bf16" else torch.float32)
            assert _close(_logits(merged_model, batch), plain, cell.dtype), "merged model differs"
            export_to_lora(adapter_dir, tmp / "lora", base_dir=base_dir)
            exported = PeftModel.from_pretrained(type(merged_model).from_pretrained(base_dir), tmp / "lora")
            assert _close(_logits(exported, batch), plain, cell.dtype), "exported LoRA differs"
            checks["merge"] = True
        if cell.adapter == "L4Q":
            checks["merge"] = _check_l4q_outputs(cell, full.model, batch, plain, tmp)
        for folder in ("full", "base", "adapter", "merged", "lora", "quantized"):
            shutil.rmtree(tmp / folder, ignore_errors=True)
    return checks


def _check_l4q_outputs(cell: Cell, model, batch, plain: torch.Tensor, tmp: Path) -> bool:
    """L4Q merges (the base weight becomes the served Ŵ) and, for nn.Linear models with torchao installed, exports
    its integer model; both give the trained model's outputs."""
    dtype = torch.bfloat16 if cell.dtype == "bf16" else torch.float32
    base_dir, adapter_dir = tmp / "base", tmp / "adapter"
    tiny_model(cell.arch, cell.dtype).save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    model_cls = getattr(T, type(model.get_base_model()).__name__)
    merged = model_cls.from_pretrained(merge_to_directory(base_dir, adapter_dir, tmp / "merged"), dtype=dtype)
    assert _close(_logits(merged, batch), plain, cell.dtype), "merged model differs"
    if cell.arch != "gpt2" and torchao_version() is not None:  # GPT-2's Conv1D is refused by the export (tested)
        served = model_cls.from_pretrained(export_quantized(base_dir, adapter_dir, tmp / "quantized"), dtype=dtype)
        assert _close(_logits(served, batch), plain, cell.dtype), "quantized export differs"
    return True


def check(cell: Cell, tmp: Path) -> tuple[str, str]:
    """``("ok" | "refused", detail)`` for one cell; assertion errors propagate (a cell must never fail late)."""
    try:
        checks = run_cell(cell, tmp)
    except Refused as refusal:
        return "refused", str(refusal)
    return "ok", "merge/export ✓" if checks["merge"] else ""


__all__: list[Callable | str] = ["FACTORS", "Cell", "Refused", "check", "pairwise_cells", "run_cell"]
