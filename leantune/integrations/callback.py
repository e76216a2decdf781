"""``LeanTuneCallback``: one object that switches leantune on inside an unmodified ``transformers`` script.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[LeanTuneCallback(adapter=LoraXSConfig(r=16, target_modules="all-linear"))])

``Trainer`` builds its optimizer only when ``train()`` starts, and tells its callbacks ``on_init_end``
at the end of ``__init__``. At that point the callback finds the trainer that is calling it (it walks
up the call stack to the ``Trainer.__init__`` frame; ``setup(trainer)`` does the same job explicitly
for custom training code) and, in this order:

1. wraps ``trainer.model`` in a ``PeftModel`` with the adapter (peft or leantune config), so only the
   adapter trains, checkpoints hold only the adapter, and ``resume_from_checkpoint`` reloads it;
   LoRA-SB first estimates its initialisation on the trainer's own first batches and learning rate;
2. applies memory-saving backprop (``memory=``), then 3. fused kernels (``kernels=``);
4. installs a leantune optimizer (``optimizer=``) in place of the trainer's default one;
5. adds LISA layer sampling (``lisa=``) as a further callback of the same trainer.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Optional, Union

from peft import PeftConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback

from leantune.adapters.lora_sb import LoraSBConfig, estimate_first_step


def find_calling_trainer() -> Optional[Trainer]:
    """The ``Trainer`` whose ``__init__`` is on the current call stack, if any."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


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
    """Add an adapter, memory savings, kernels and a low-rank optimizer to a ``Trainer`` run.

    Args:
        adapter: a peft config (``LoraConfig`` …) or a leantune one (``LoraXSConfig``, ``LoraSBConfig`` …).
            ``None`` leaves the model as it is (e.g. full fine-tuning with a GaLore optimizer).
        optimizer: a ``leantune.optim.OptimizerConfig`` or an optimizer name such as ``"galore_adamw"``.
        memory: a ``leantune.memory.MemoryConfig`` (or ``True`` for its defaults).
        kernels: ``True``/``False`` to force fused kernels on/off; ``None`` = on for CUDA models only.
        lisa: a ``leantune.optim.LISACallback`` (or a dict of its arguments) to sample trainable layers.
        adapter_name: name of the injected adapter.
        verbose: print what was switched on.
    """

    def __init__(
        self,
        adapter: Optional[PeftConfig] = None,
        optimizer: Union[str, Any, None] = None,
        memory: Union[bool, Any, None] = None,
        kernels: Optional[bool] = None,
        lisa: Union[dict, Any, None] = None,
        adapter_name: str = "default",
        verbose: bool = True,
    ) -> None:
        if adapter is not None and not isinstance(adapter, PeftConfig):
            raise TypeError(f"adapter must be a peft or leantune config, got {type(adapter).__name__}.")
        self.adapter = adapter
        self.optimizer = optimizer
        self.memory = memory
        self.kernels = kernels
        self.lisa = lisa
        self.adapter_name = adapter_name
        self.verbose = verbose
        self.trainer: Optional[Trainer] = None

    # --- Trainer hook ----------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):  # noqa: D401 - transformers signature
        trainer = find_calling_trainer()
        if trainer is None:
            raise RuntimeError(
                "LeanTuneCallback could not find the Trainer that created it. If you build the trainer in an "
                "unusual way, call `callback.setup(trainer)` yourself before `trainer.train()`."
            )
        self.setup(trainer)
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("LeanTuneCallback was never set up: pass it to Trainer(callbacks=[...]).")
        return control

    # --- the work --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        """Apply every configured option to ``trainer`` (idempotent)."""
        if self.trainer is trainer:
            return
        self.trainer = trainer
        if self.adapter is not None:
            self._inject_adapter(trainer)
        if self.memory:
            from leantune import memory as lt_memory

            config = lt_memory.MemoryConfig() if self.memory is True else self.memory
            lt_memory.apply(trainer.model, config)
            self._say(f"memory-saving backprop on: {config}")
        if self.kernels or (self.kernels is None and _on_cuda(trainer)):
            from leantune import kernels as lt_kernels

            counts = lt_kernels.apply(trainer.model, enable=True)
            self._say(f"fused kernels on: {counts}")
        if self.optimizer is not None:
            from leantune import optim as lt_optim

            lt_optim.install_in_trainer(trainer, self.optimizer)
            self._say(f"optimizer: {self.optimizer}")
        if self.lisa is not None:
            from leantune.optim import LISACallback

            lisa = LISACallback(**self.lisa) if isinstance(self.lisa, dict) else self.lisa
            trainer.add_callback(lisa)
            self._say(f"LISA layer sampling: {lisa.n_layers} layers every {lisa.interval_steps} steps")

    def prepare(self, model: Any) -> PeftModel:
        """Wrap ``model`` with the adapter now (for quantized models, which ``Trainer`` refuses unwrapped)."""
        if self.adapter is None:
            raise ValueError("prepare() needs an adapter config.")
        if isinstance(self.adapter, LoraSBConfig):
            raise ValueError("LoRA-SB needs training batches: use leantune.adapters.get_lora_sb_model(...).")
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
        if isinstance(self.adapter, LoraSBConfig) and not self.adapter.gradient_init_done:
            batches = itertools.islice(trainer.get_train_dataloader(), self.adapter.num_init_batches)
            lr = first_step_learning_rate(trainer)
            estimate_first_step(
                model,
                self.adapter,
                (trainer._prepare_inputs(batch) for batch in batches),
                lr=lr,
                loss_fn=lambda m, batch: trainer.compute_loss(m, batch),
            )
        peft_model = get_peft_model(model, self.adapter, adapter_name=self.adapter_name)
        if isinstance(self.adapter, LoraSBConfig):
            self.adapter.gradient_init_done = True
        trainer.model = trainer.model_wrapped = peft_model
        trainer.callback_handler.model = peft_model
        if self.verbose:
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in peft_model.parameters())
            self._say(f"{type(self.adapter).__name__} injected: {trainable:,} of {total:,} parameters train")

    def _say(self, message: str) -> None:
        if self.verbose and (self.trainer is None or self.trainer.is_world_process_zero()):
            print(f"[leantune] {message}")


def _on_cuda(trainer: Trainer) -> bool:
    try:
        return next(trainer.model.parameters()).is_cuda
    except StopIteration:
        return False
