"""LeanTuneCallback in a real (tiny) Trainer run: injection, what trains, checkpoints, resume."""

from __future__ import annotations

import os

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import leantune
from leantune.adapters.lora_sb import LoraSBLayer


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def toy_dataset(n: int = 32) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    labels = (ids[:, 0] > 32).long()  # learnable from the first token
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def make_trainer(tmp_path, callback, model=None, max_steps=4, **kw) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
        seed=0, data_seed=0, **kw,
    )
    return callback.setup(Trainer(model=model or tiny_bert(), args=args, train_dataset=toy_dataset()))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", [
    leantune.LoraXSConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
], ids=["leantune-lora-xs", "peft-lora"])
def test_callback_injects_before_the_optimizer_and_saves_only_the_adapter(tmp_path, config):
    base = tiny_bert()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if "classifier" not in n}
    trainer = make_trainer(tmp_path, leantune.LeanTuneCallback(adapter=config, verbose=False), model=base)
    assert isinstance(trainer.model, PeftModel)
    before = adapter_state(trainer.model)
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert optimized == trainable
    after = adapter_state(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    now = {n.replace(".base_layer", ""): p for n, p in trainer.model.get_base_model().named_parameters()}
    for name, value in frozen.items():  # the base weights did not move
        assert torch.equal(now[name], value), name
    files = os.listdir(tmp_path / "checkpoint-4")
    assert "adapter_model.safetensors" in files
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files


def test_resume_from_checkpoint_continues_the_adapter_exactly(tmp_path):
    config = lambda: leantune.LoraXSConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")  # noqa: E731
    full = make_trainer(tmp_path / "full", leantune.LeanTuneCallback(adapter=config(), verbose=False))
    full.train()
    expected = adapter_state(full.model)

    first = make_trainer(tmp_path / "part", leantune.LeanTuneCallback(adapter=config(), verbose=False))
    first.add_callback(StopAt(2))  # same 4-step schedule, interrupted after step 2
    first.train()
    assert first.state.global_step == 2
    resumed = make_trainer(tmp_path / "part", leantune.LeanTuneCallback(adapter=config(), verbose=False))
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    got = adapter_state(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_lora_sb_through_the_callback_uses_the_trainers_batches_and_lr(tmp_path):
    config = leantune.LoraSBConfig(r=2, target_modules=["query"], task_type="SEQ_CLS", num_init_batches=2)
    trainer = make_trainer(tmp_path, leantune.LeanTuneCallback(adapter=config, verbose=False), warmup_steps=2)
    assert config.gradient_init_done
    layers = [m for m in trainer.model.modules() if isinstance(m, LoraSBLayer)]
    assert len(layers) == 2
    # ΔW at init is a rank-2 approximation of −η₁·sign(G) with η₁ = 1e-2 / 2 warmup steps: entries ≈ ±5e-3
    delta = layers[0].get_delta_weight("default")
    assert 1e-3 < delta.abs().mean() < 6e-3
    trainer.train()


def test_callback_rejects_a_non_config():
    with pytest.raises(TypeError, match="peft or leantune config"):
        leantune.LeanTuneCallback(adapter={"r": 4})


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def lm_dataset(n: int = 32) -> datasets.Dataset:
    ids = torch.randint(1, 64, (n, 8), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def test_one_callback_switches_on_adapter_optimizer_and_lisa(tmp_path):
    from leantune.optim import GaLoreAdamW, LISACallback

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-3)
    callback = leantune.LeanTuneCallback(
        optimizer=leantune.optim.OptimizerConfig("galore_adamw", rank=4, update_proj_gap=2,
                                                 target_modules=["q_proj", "v_proj"]),
        lisa={"n_layers": 1, "interval_steps": 2}, verbose=False,
    )
    trainer = callback.setup(Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset()))
    assert any(isinstance(cb, LISACallback) for cb in trainer.callback_handler.callbacks)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      GaLoreAdamW)
    low_rank = [g for g in trainer.optimizer.param_groups if g.get("rank")]
    assert low_rank and all(p.dim() == 2 for g in low_rank for p in g["params"])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_adapter_and_low_rank_optimizer_together(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-2)
    callback = leantune.LeanTuneCallback(
        adapter=leantune.DyLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
        optimizer=leantune.optim.OptimizerConfig("galore_adamw", rank=2, target_modules="all-linear"),
        verbose=False,
    )
    trainer = callback.setup(Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset()))
    trainer.train()
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters() if p.requires_grad}


def test_memory_and_kernel_options_patch_the_trained_model(tmp_path):
    from leantune.kernels import patched_modules
    from leantune.memory import MemoryConfig

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=1e-3)
    callback = leantune.LeanTuneCallback(
        adapter=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        memory=MemoryConfig.exact(), kernels=True, verbose=False,
    )
    trainer = callback.setup(Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset()))
    assert patched_modules(trainer.model)  # kernels=True on CPU: the torch-reference paths
    norms = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(torch.all(m.weight == 1) for m in norms[:-1])  # folded into the next linears
    trainer.train()
    assert trainer.state.global_step == 2


def test_callback_refuses_a_low_rank_optimizer_under_deepspeed_before_touching_the_model(tmp_path):
    """Under DeepSpeed ZeRO the client optimizer sees flat 1-D slices: GaLore would silently run as full-rank AdamW
    (spec: measured). Refused at setup (the flag set as accelerate sets it), before the adapter is injected."""
    from leantune.optim import OptimizerConfig

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=toy_dataset())
    trainer.is_deepspeed_enabled = True
    callback = leantune.LeanTuneCallback(adapter=leantune.LoraXSConfig(r=4, target_modules=["query", "value"],
                                                                       task_type="SEQ_CLS"),
                                         optimizer=OptimizerConfig("galore_adamw", rank=4), verbose=False)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO.*full-rank AdamW"):
        callback.setup(trainer)
    assert not any("loraxs" in n for n, _ in trainer.model.named_parameters())  # nothing half set up


@pytest.mark.parametrize("case", ["lisa", "layerwise", "mixed dtypes"])
def test_callback_refuses_at_setup_what_fsdp_cannot_run(tmp_path, case):
    """Under accelerate's FSDP (simulated: accelerate turns FSDP on only for accelerator devices, so this sets the
    trainer's flag the way it would), LISA, per-layer updates and a unit of trainable tensors with two dtypes
    (bf16 LayerNorms + Compacter's fp32 adapter) raise at setup, before any training step."""
    from leantune.optim import OptimizerConfig

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no")
    model = tiny_bert().to(torch.bfloat16) if case == "mixed dtypes" else tiny_bert()
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset())
    trainer.is_fsdp_enabled = True
    callback = leantune.LeanTuneCallback(
        adapter=leantune.CompacterConfig(reduction_factor=4, task_type="SEQ_CLS") if case == "mixed dtypes" else None,
        optimizer=OptimizerConfig("galore_adamw", rank=4, layerwise=case == "layerwise")
        if case == "layerwise" else None,
        lisa={"n_layers": 1} if case == "lisa" else None, verbose=False)
    match = {"lisa": "LISA under FSDP", "layerwise": "per-layer updates", "mixed dtypes": "one dtype"}[case]
    with pytest.raises(ValueError, match=match):
        callback.setup(trainer)
