"""transformers.Trainer integration through the optimizer-factory hook (transformers >= 5).

``Trainer.create_optimizer`` instantiates ``optimizer_cls_and_kwargs[0]`` when it is not an Optimizer class and
calls the instance with ``(model, **kwargs)``.  We use that so the optimizer is built from the (possibly peft)
model the Trainer trains, after the Trainer's own setup, and is rebuilt identically on ``resume_from_checkpoint``
before the saved ``optimizer.pt`` (tensors and plain values only) is loaded into it.

Layer-wise mode in a Trainer: the optimizer is a real ``torch.optim.Optimizer`` whose parameters are updated by
hooks inside ``accelerator.backward`` (under DDP: by the communication hook ``attach_ddp`` registers on the wrapped
model, with accelerate's ``no_sync`` micro-steps doing the accumulation); ``Trainer``'s ``optimizer.step()`` only flushes partial accumulation
windows, and the Trainer's LR scheduler steps once per optimizer step as usual (so no
``LayerWiseDummyOptimizer``/``LayerWiseDummyScheduler`` pair is needed).  Global clipping (``max_grad_norm``)
cannot work there, so it is turned off with a warning; use ``max_grad_norm_per_param``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback

from leantune.optim.config import OPTIMIZERS, OptimizerConfig, build_optimizer, quantize_model_weights
from leantune.optim.param_groups import find_target_weights


class LowRankOptimizerFactory:
    """Callable for ``Trainer(optimizer_cls_and_kwargs=(LowRankOptimizerFactory, {"config": cfg}))``."""

    def __call__(self, model: nn.Module, config: OptimizerConfig | str | dict[str, Any]):
        return build_optimizer(model, config)


def _with_training_args(config: OptimizerConfig, args: Any) -> OptimizerConfig:
    """Fill unset fields from TrainingArguments so ``--learning_rate`` etc. keep working."""
    updates: dict[str, Any] = {}
    if config.lr is None:
        updates["lr"] = args.learning_rate
    if config.weight_decay is None:
        updates["weight_decay"] = args.weight_decay
    if OPTIMIZERS[config.name].adam:
        if config.betas is None:
            updates["betas"] = (args.adam_beta1, args.adam_beta2)
        if config.eps is None and not config.reference_adam:
            updates["eps"] = args.adam_epsilon
    if config.layerwise:  # under DDP, accelerate's no_sync micro-steps do the accumulating (attach_ddp)
        updates["accumulation_steps"] = 1 if getattr(args, "world_size", 1) > 1 else args.gradient_accumulation_steps
    return dataclasses.replace(config, **updates)


def optimizer_cls_and_kwargs(
    model: nn.Module | None, config: OptimizerConfig | str | dict[str, Any], training_args: Any = None
) -> tuple[type, dict[str, Any]]:
    """Value for ``Trainer(optimizer_cls_and_kwargs=...)``.  ``model`` (optional) is used to validate
    ``target_modules`` early; ``training_args`` fills unset lr / weight decay / betas / eps."""
    config = OptimizerConfig.from_any(config)
    if training_args is not None:
        config = _with_training_args(config, training_args)
    if model is not None:
        find_target_weights(model, config.target_modules)  # raises a clear error on a bad target list
    return LowRankOptimizerFactory, {"config": config}


class AttachLayerwiseDDP(TrainerCallback):
    """Under DDP, hands the Trainer's DistributedDataParallel model to the per-layer optimizer
    (``attach_ddp``) once accelerate has wrapped it, before the first backward."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # accelerate's wrapper
        if not isinstance(wrapped, DistributedDataParallel):
            raise RuntimeError(f"layer-wise updates with world_size={args.world_size} need the model wrapped in "
                               f"DistributedDataParallel; the Trainer wrapped it in {type(wrapped).__name__}. "
                               "Use layerwise=False.")
        if getattr(optimizer, "_ddp", None) is not wrapped:
            optimizer.attach_ddp(wrapped)
        return control


def _check_layerwise_trainer(trainer: Any) -> None:
    args = trainer.args
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise RuntimeError("Layer-wise optimizer updates do not support DeepSpeed/FSDP; set layerwise=False.")
    if getattr(args, "fp16", False):
        raise RuntimeError(
            "Layer-wise updates step inside backward, before fp16 loss-scale unscaling; use bf16 or fp32 "
            "(or layerwise=False)."
        )
    if args.max_grad_norm and args.max_grad_norm > 0:
        warnings.warn(
            f"Layer-wise updates free each gradient inside backward, so global gradient clipping "
            f"(max_grad_norm={args.max_grad_norm}) is impossible; it is disabled. Use "
            "OptimizerConfig(max_grad_norm_per_param=...) to clip each parameter's gradient instead.",
            UserWarning,
            stacklevel=3,
        )
        args.max_grad_norm = 0.0


def install_in_trainer(trainer: Any, optimizer_config: OptimizerConfig | str | dict[str, Any]) -> OptimizerConfig:
    """Make ``trainer`` build the configured low-rank optimizer (call before ``trainer.train()``, e.g. from a
    callback's ``on_init_end``).  Returns the resolved config."""
    if getattr(trainer, "optimizer", None) is not None:
        raise RuntimeError(
            "install_in_trainer: the Trainer already has an optimizer (passed via `optimizers=` or already created); "
            "remove it so the low-rank optimizer can be built."
        )
    config = _with_training_args(OptimizerConfig.from_any(optimizer_config), trainer.args)
    if config.layerwise:
        _check_layerwise_trainer(trainer)
        if getattr(trainer.args, "world_size", 1) > 1:
            trainer.add_callback(AttachLayerwiseDDP(trainer))
    trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(trainer.model, config)
    # INT8 weights (Q-GaLore) now, not when the optimizer is built: resume_from_checkpoint loads the model's weights
    # before that, and must find the INT8 layers its checkpoint was written from
    if quantize_model_weights(trainer.model, config) and trainer.args.max_grad_norm and \
            trainer.args.max_grad_norm > 0:
        warnings.warn(f"{config.name} trains INT8 weights, whose float gradients are not .grad: the Trainer's global "
                      f"clipping (max_grad_norm={trainer.args.max_grad_norm}) would not see them, so it is disabled. "
                      "Use OptimizerConfig(max_grad_norm_per_param=...) to clip each weight's gradient.",
                      UserWarning, stacklevel=2)
        trainer.args.max_grad_norm = 0.0
    return config
