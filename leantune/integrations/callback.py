"""``LeanTuneCallback``: switch leantune on inside an unmodified ``transformers`` script, with one explicit call.

    callback = LeanTuneCallback(adapter=LoraXSConfig(r=16, target_modules="all-linear"), memory=True)
    trainer = callback.setup(Trainer(model=model, args=args, train_dataset=ds))
    trainer.train()

``setup(trainer)`` is the one way the callback meets its trainer (a ``TrainerCallback``'s hooks receive the model,
never the trainer). It must run before ``trainer.train()`` creates the optimizer, and does, in this order:

1. wraps ``trainer.model`` in a ``PeftModel`` with the adapter (peft or leantune config), so only the adapter
   trains, checkpoints hold only the adapter, and ``resume_from_checkpoint`` reloads it; LoRA-SB first estimates
   its initialisation on the trainer's own first batches and learning rate;
2. applies memory-saving backprop (``memory=``) and fused kernels (``kernels=``) through the one patcher;
3. installs a leantune optimizer (``optimizer=``) through transformers' optimizer-factory hook;
4. adds LISA layer sampling (``lisa=``) as a further callback of the same trainer, and itself if absent.

Every option is checked when the callback is built; a callback passed to ``Trainer(callbacks=[...])`` but never
set up stops ``train()`` before the first step with a message saying so.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Optional, Union

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback

from leantune._utils import NonFiniteGradientWarning, one_bnb_cpu_path
from leantune.integrations.fsdp import check_fsdp2_units
from leantune.optim import LISACallback, OptimizerConfig, QuZOConfig, install_in_trainer
from leantune.optim.quzo import install_in_trainer as install_zeroth_order
from leantune.patching.kernels_view import apply as apply_kernels
from leantune.patching.memory_view import apply as apply_memory
from leantune.patching.options import ALL_KERNELS, MemoryConfig


def first_step_learning_rate(trainer: Trainer) -> float:
    """The learning rate of the first optimizer step under the trainer's linear warmup."""
    args = trainer.args
    steps = args.max_steps if args.max_steps > 0 else None
    if steps is None:
        per_epoch = max(1, len(trainer.get_train_dataloader()) // max(1, args.gradient_accumulation_steps))
        steps = int(per_epoch * args.num_train_epochs)
    warmup = args.get_warmup_steps(steps)
    return args.learning_rate / max(1, warmup)


class LeanTuneCallback(TrainerCallback):
    """Add an adapter, memory savings, kernels, a low-rank optimizer and LISA to a ``Trainer`` run.

    Args:
        adapter: a peft config (``LoraConfig`` …) or a leantune one (``LoraXSConfig``, ``LoraSBConfig`` …).
            ``None`` leaves the model as it is (e.g. full fine-tuning with a GaLore optimizer).
        optimizer: a ``leantune.optim.OptimizerConfig``, a dict of its fields, or an optimizer name such as
            ``"galore_adamw"``; or ``leantune.optim.QuZOConfig(...)`` / ``"quzo"`` for zeroth-order training (two
            forward passes per step, no backward: ``leantune.optim.quzo``).
        memory: a ``leantune.memory.MemoryConfig`` (or ``True`` for its defaults).
        kernels: ``True``/``False`` to force fused kernels on/off, a list of kernel names; ``None`` = on for CUDA
            models only.
        lisa: a ``leantune.optim.LISACallback`` (or a dict of its arguments) to sample trainable layers.
        adapter_name: name of the injected adapter.
        verbose: print what was switched on.
    """

    def __init__(
        self,
        adapter: Optional[PeftConfig] = None,
        optimizer: Union[str, dict, Any, None] = None,
        memory: Union[bool, Any, None] = None,
        kernels: Union[bool, list, tuple, None] = None,
        lisa: Union[dict, Any, None] = None,
        adapter_name: str = "default",
        verbose: bool = True,
    ) -> None:
        if adapter is not None and not isinstance(adapter, PeftConfig):
            raise TypeError(f"adapter must be a peft or leantune config, got {type(adapter).__name__}.")
        if memory is True:
            memory = MemoryConfig()
        elif isinstance(memory, dict):  # MemoryConfig's fields, e.g. {"chunked_loss": True}
            unknown = sorted(set(memory) - set(MemoryConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"memory: unknown option(s) {unknown}; MemoryConfig's options: "
                                 f"{sorted(MemoryConfig.__dataclass_fields__)}.")
            memory = MemoryConfig(**memory)
        elif memory is not None and memory is not False and not isinstance(memory, MemoryConfig):
            raise TypeError(f"memory must be a leantune.memory.MemoryConfig, a dict of its options, True or None, got "
                            f"{type(memory).__name__}.")
        if kernels not in (None, True, False):
            if isinstance(kernels, str) or not all(k in ALL_KERNELS for k in kernels):
                raise ValueError(f"kernels must be True/False/None or a list of kernel names from {list(ALL_KERNELS)}, "
                                 f"got {kernels!r}.")
            kernels = list(kernels)
        if optimizer == "quzo":
            optimizer = QuZOConfig()
        if optimizer is not None and not isinstance(optimizer, QuZOConfig):
            optimizer = OptimizerConfig.from_any(optimizer)  # raises on unknown names and fields
        if isinstance(lisa, dict):
            lisa = LISACallback(**lisa)
        elif lisa is not None and not isinstance(lisa, LISACallback):
            raise TypeError(f"lisa must be a LISACallback or a dict of its arguments, got {type(lisa).__name__}.")
        self.adapter, self.optimizer, self.memory = adapter, optimizer, memory or None
        self.kernels, self.lisa = kernels, lisa
        self.adapter_name = adapter_name
        self.verbose = verbose
        self.trainer: Optional[Trainer] = None

    # --- Trainer hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "LeanTuneCallback was never set up, so nothing of it is active: call `callback.setup(trainer)` "
                "after building the Trainer and before `trainer.train()`."
            )
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        """Non-finite guard: NaN/inf in any gradient (after clipping one poisons all) skips the optimizer step —
        every gradient is dropped, so no optimizer moves a weight — with a warning."""
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            warnings.warn(f"LeanTuneCallback: step {state.global_step + 1} has NaN/inf gradients; the optimizer step "
                          "is skipped (weights and optimizer state unchanged).", NonFiniteGradientWarning,
                          stacklevel=2)
            for p in self.trainer.model.parameters():
                p.grad = None
        return control

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        hook = getattr(getattr(self.trainer.model, "base_model", None), "before_train_step", None)
        if callable(hook):  # a leantune tuner (e.g. DyLoRA reseeds its rank draws: resumed runs draw the same)
            hook(state.global_step)
        return control

    # --- the work --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> Trainer:
        """Apply every configured option to ``trainer`` (once) and return it; call before ``trainer.train()``."""
        if self.trainer is trainer:
            return trainer
        if self.trainer is not None:
            raise RuntimeError("This LeanTuneCallback is already set up with another Trainer; create one per trainer.")
        if getattr(trainer, "optimizer", None) is not None and self.optimizer is not None:
            raise RuntimeError("setup(trainer) must run before the trainer creates its optimizer (before train()).")
        if getattr(trainer, "is_deepspeed_enabled", False) and self.optimizer is not None:
            raise ValueError(f"optimizer {self.optimizer.name!r} under DeepSpeed ZeRO: DeepSpeed gives the client "
                             "optimizer one flat 1-D slice per parameter group, so a low-rank optimizer would find no "
                             "matrix to project and silently train as full-rank AdamW. Use leantune's optimizers "
                             "under FSDP2 (accelerate's FSDP2 plugin, or leantune.shard_model) or DDP; under DeepSpeed "
                             "leave optimizer= out and let DeepSpeed build its own.")
        if one_bnb_cpu_path(trainer.model):
            self._say("bitsandbytes 4-bit layers: one CPU numeric path for training and evaluation")
        if self.adapter is not None:
            self._inject_adapter(trainer)
        if self.memory is not None:
            self._apply_memory(trainer)
        if self.kernels or (self.kernels is None and _on_cuda(trainer)):
            enable = True if self.kernels in (None, True) else self.kernels
            self._say(f"fused kernels on: {apply_kernels(trainer.model, enable=enable)}")
        if isinstance(self.optimizer, QuZOConfig):  # zeroth order: refuses sharded setups itself
            install_zeroth_order(trainer, self.optimizer)
            self._say(f"optimizer: QuZO (zeroth order, {self.optimizer.bits}-bit perturbations)")
        elif getattr(trainer, "is_fsdp_enabled", False):  # before the optimizer: nothing half set up on refusal
            self._check_fsdp(trainer)
        if self.optimizer is not None and not isinstance(self.optimizer, QuZOConfig):
            install_in_trainer(trainer, self.optimizer)
            self._say(f"optimizer: {self.optimizer.name}")
        if self.lisa is not None:
            trainer.add_callback(self.lisa)
            self._say(f"LISA layer sampling: {self.lisa.n_layers} layers every {self.lisa.interval_steps} steps")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return trainer

    def _check_fsdp(self, trainer: Trainer) -> None:
        """Under accelerate's FSDP, refuse at setup what cannot work (``leantune.integrations.fsdp``)."""
        plugin = getattr(getattr(trainer.accelerator, "state", None), "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 2)
        if self.lisa is not None:
            raise ValueError("LISA under FSDP is not supported (see LISACallback.setup); use it under DDP.")
        if self.optimizer is not None and (version != 2 or self.optimizer.layerwise):
            raise ValueError(f"optimizer {self.optimizer.name!r} under FSDP{version}: leantune's optimizers run on "
                             "FSDP2 row shards only, and per-layer updates (layerwise=True) not at all under FSDP; use "
                             "FSDP2 with layerwise=False, or DDP for per-layer updates.")
        if version == 2:
            check_fsdp2_units(trainer.model)

    def _apply_memory(self, trainer: Trainer) -> None:
        kwargs = trainer.args.gradient_checkpointing_kwargs or {}
        if self.memory.ms_norms and trainer.args.gradient_checkpointing and kwargs.get("use_reentrant", False):
            raise ValueError("LeanTuneCallback(memory=...): folded norms need non-reentrant gradient checkpointing; "
                             "set TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False}).")
        handle = apply_memory(trainer.model, self.memory)
        if not handle.active:
            raise ValueError(f"LeanTuneCallback(memory=...): {handle.report[0]}")
        if self.memory.velora:  # VeLoRA's v comes from the first batch: the trainer's own, in every (resumed) run
            batch = self._first_batches(trainer, 1)[0]
            with torch.random.fork_rng(), torch.enable_grad():
                trainer.model.train()
                trainer.model(**batch)
        self._say(f"memory-saving backprop on: {handle.counts}")

    @staticmethod
    def _first_batches(trainer: Trainer, n: int) -> list[dict]:
        """The trainer's first ``n`` training batches on its device; the global RNG is left as it was."""
        device = trainer.args.device
        with torch.random.fork_rng():
            batches = list(itertools.islice(trainer.get_train_dataloader(), n))
        return [{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]

    def prepare(self, model: Any) -> PeftModel:
        """Wrap ``model`` with the adapter now (for quantized models, which ``Trainer`` refuses unwrapped)."""
        if self.adapter is None:
            raise ValueError("prepare() needs an adapter config.")
        if _init_batches_needed(self.adapter):
            raise ValueError(f"{type(self.adapter).__name__} needs training batches for its initialisation: pass "
                             "the model to Trainer with LeanTuneCallback(adapter=...), or build it with the "
                             "method's own function (LoRA-SB: leantune.adapters.get_lora_sb_model(...)).")
        return get_peft_model(model, self.adapter, adapter_name=self.adapter_name)

    def _inject_adapter(self, trainer: Trainer) -> None:
        model = trainer.model
        if isinstance(model, PeftModel):
            if self.adapter_name not in model.peft_config:
                raise ValueError(
                    f"The model is already a PeftModel with adapters {sorted(model.peft_config)}; pass the plain "
                    "model to Trainer, or drop `adapter=` from LeanTuneCallback."
                )
            self._say(f"model already carries adapter {self.adapter_name!r}; not injecting again")
            return
        needed = _init_batches_needed(self.adapter)
        if needed:  # a data-driven initialisation (LoRA-SB's first-step estimate), through the config's hook
            with torch.random.fork_rng():
                peft_model = self.adapter.inject_from_batches(
                    model, self._first_batches(trainer, needed), first_step_learning_rate(trainer),
                    lambda m, batch: trainer.compute_loss(m, batch), self.adapter_name)
        else:
            peft_model = get_peft_model(model, self.adapter, adapter_name=self.adapter_name)
        trainer.model = trainer.model_wrapped = peft_model
        trainer.callback_handler.model = peft_model
        if self.verbose:
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in peft_model.parameters())
            self._say(f"{type(self.adapter).__name__} injected: {trainable:,} of {total:,} parameters train")

    def _say(self, message: str) -> None:
        if self.verbose and (self.trainer is None or self.trainer.is_world_process_zero()):
            print(f"[leantune] {message}")


def _init_batches_needed(adapter: Any) -> int:
    """Training batches ``adapter``'s initialisation needs (a hook of leantune configs; 0 for peft's own)."""
    hook = getattr(adapter, "init_batches_needed", None)
    return int(hook()) if callable(hook) else 0


def _on_cuda(trainer: Trainer) -> bool:
    try:
        return next(trainer.model.parameters()).is_cuda
    except StopIteration:
        return False
