"""Trainer integration (install_in_trainer, checkpoint resume, layer-wise + accumulation) and LISA."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from leantune.optim import (
    FiraAdamW,
    GaLoreAdamW,
    LISACallback,
    OptimizerConfig,
    build_optimizer,
    install_in_trainer,
    optimizer_cls_and_kwargs,
    optimizer_state_bytes,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 24, seq: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def make_trainer(tmp_path, name, config, callbacks=(), **arg_overrides):
    args = dict(output_dir=str(tmp_path / name), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, report_to=[], use_cpu=True,
                logging_steps=100, save_strategy="steps", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    args.update(arg_overrides)
    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(**args), train_dataset=dataset(),
                      callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        install_in_trainer(trainer, config)
    return trainer


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "config",
    [
        OptimizerConfig(name="galore_adamw", rank=4, update_proj_gap=2, target_modules=["q_proj", "up_proj", "down_proj"]),
        OptimizerConfig(name="fira_adamw", rank=4, update_proj_gap=2, layerwise=True),
    ],
    ids=["galore", "fira-layerwise"],
)
def test_trainer_checkpoint_resume_matches_uninterrupted(tmp_path, config):
    full = make_trainer(tmp_path, "full", config)
    full.train()
    opt = getattr(full.optimizer, "optimizer", full.optimizer)
    assert isinstance(opt, FiraAdamW if config.name == "fira_adamw" else GaLoreAdamW)
    assert opt.layerwise == config.layerwise
    assert full.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear schedule stepped exactly 6 times
    resumed = make_trainer(tmp_path, "full", config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert same(weights(full.model), weights(resumed.model))
    assert not same(weights(full.model), weights(tiny_llama()))


def test_trainer_layerwise_with_accumulation_equals_plain(tmp_path):
    base = dict(name="galore_adamw", rank=4, update_proj_gap=2)
    plain = make_trainer(tmp_path, "plain", OptimizerConfig(**base), gradient_accumulation_steps=2,
                         max_grad_norm=0.0, per_device_train_batch_size=2, save_steps=100)
    plain.train()
    lw = make_trainer(tmp_path, "lw", OptimizerConfig(**base, layerwise=True), gradient_accumulation_steps=2,
                      per_device_train_batch_size=2, save_steps=100)
    assert lw.args.max_grad_norm == 0.0  # global clipping turned off (with a warning)
    lw.train()
    assert lw.optimizer.optimizer.accumulation_steps == 2
    for a, b in zip(plain.model.parameters(), lw.model.parameters()):  # same math; only summation order may differ
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_layerwise_refuses_fp16_and_bad_targets(tmp_path):
    trainer = make_trainer(tmp_path, "x", "galore_adamw")
    trainer.args.fp16 = True
    trainer.optimizer_cls_and_kwargs = None
    with pytest.raises(RuntimeError, match="fp16"):
        install_in_trainer(trainer, OptimizerConfig(layerwise=True))
    with pytest.raises(ValueError, match="matched no trainable"):
        optimizer_cls_and_kwargs(tiny_llama(), OptimizerConfig(target_modules=["nope"]))


def _layer_state_bytes(opt, layers):
    return sum(t.untyped_storage().nbytes() for layer in layers for p in layer.parameters()
               for t in opt.state.get(p, {}).values() if isinstance(t, torch.Tensor))


def test_lisa_frees_states_of_deactivated_layers():
    model = tiny_llama()
    opt = build_optimizer(model, OptimizerConfig(name="galore_adamw", rank=4, lr=1e-3))
    lisa = LISACallback(n_layers=1, interval_steps=2, seed=1)
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()  # every layer has state now (the optimizer knows all layers)
    layers = model.model.layers
    before = optimizer_state_bytes(opt)
    per_layer = [_layer_state_bytes(opt, [l]) for l in layers]
    active = lisa.switch(model, opt, global_step=0)
    after = optimizer_state_bytes(opt)
    assert len(active) == 1
    inactive = [l for i, l in enumerate(layers) if i not in active]
    assert _layer_state_bytes(opt, inactive) == 0 and _layer_state_bytes(opt, [layers[active[0]]]) > 0
    # exactly the states of the 3 frozen layers are gone; embeddings/head/active layer keep theirs
    assert after == before - sum(b for i, b in enumerate(per_layer) if i not in active)
    assert min(per_layer) > 0 and after < before
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert all(not p.requires_grad for l in inactive for p in l.parameters())
    # the next interval can re-activate any layer: they are all still in the optimizer's param groups
    all_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in all_params for p in layers.parameters())
    assert lisa.switch(model, opt, 2) == lisa.sample(1)


def test_lisa_in_trainer(tmp_path):
    lisa = LISACallback(n_layers=2, interval_steps=2, seed=0)
    trainer = make_trainer(tmp_path, "lisa", OptimizerConfig(rank=4), callbacks=[lisa], save_steps=100, max_steps=4)
    trainer.train()
    opt = trainer.optimizer.optimizer
    layers = trainer.model.model.layers
    with_state = [i for i, l in enumerate(layers) if any(p in opt.state for p in l.parameters())]
    assert with_state == lisa.active == lisa.sample(1)


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_qgalore_in_trainer_resumes_bit_exact(tmp_path, layerwise, bf16):
    """Q-GaLore through install_in_trainer: the INT8 layers are made at install (before resume_from_checkpoint loads
    the checkpoint's INT8 codes and scales into them), the LR schedule reaches every update, global clipping is
    turned off with a warning (it cannot see the INT8 weights' gradients), and a resumed run ends bit for bit where
    the uninterrupted one does."""
    config = OptimizerConfig(name="q_galore_adamw8bit", rank=4, update_proj_gap=2, layerwise=layerwise,
                             optimizer_kwargs={"lazy_queue": 2})
    full = make_trainer(tmp_path, "full", config, bf16=bf16)
    assert full.args.max_grad_norm == 0.0
    assert type(full.model.model.layers[0].self_attn.q_proj).__name__ == "Int8Linear"
    full.train()
    assert full.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    resumed = make_trainer(tmp_path, "full", config, bf16=bf16)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    final = weights(full.model)
    assert same(final, weights(resumed.model))
    start = make_trainer(tmp_path, "start", config, bf16=bf16)
    assert not torch.equal(final["model.layers.0.mlp.up_proj.weight"],  # deq(W): the INT8 codes trained
                           weights(start.model)["model.layers.0.mlp.up_proj.weight"])
