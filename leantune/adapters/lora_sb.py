"""LoRA-SB: LoRA-XS's architecture, initialised from the first full fine-tuning step.

Ponkshe et al., "Initialization using Update Approximation is a Silver Bullet for Extreme Efficient
Low-Rank Fine-Tuning" (arXiv 2411.19557)::

    G   = Σ_batches ∇_W L            gradients of the full weights on a few batches of the user's data
    ΔW  = −η₁ · sign(G)              AdamW's first (bias-corrected) step; η₁ = lr at the first warmup step
    ΔW  ≈ U_r Σ_r V_rᵀ               best rank-r approximation (Eckart–Young)
    B = U_r (frozen),  A = V_rᵀ (frozen),  R_init = Σ_r / s (trainable),  s = α / r
    W = W0 + s · B R A               W0 is not modified: training starts at W0 + trunc_r(ΔW)

Only ``R`` trains (``r²`` per matrix). Because B and A come from the gradients, not from W0, they are
stored with the adapter (merging and export need them).

Use :func:`get_lora_sb_model` from a training loop, or ``LeanTuneCallback(adapter=LoraSBConfig(...))``
with ``Trainer`` (it runs the estimate on the trainer's first batches and the trainer's learning rate).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .lora_xs import SandwichLayer, truncated_svd
from .low_rank import LowRankConfig, LowRankModel
from .registration import LeanTuneType, register_tuner

_INIT_ATTRIBUTE = "_leantune_lora_sb_init"  # set on base modules by estimate_first_step, consumed on injection


@dataclass
class LoraSBConfig(LowRankConfig):
    """Configuration of a LoRA-SB adapter.

    Args:
        r: rank; each adapted matrix trains ``r²`` parameters.
        lora_alpha: scale numerator, ``s = lora_alpha / r``; the output at init does not depend on it
            (``R_init = Σ_r / s``). ``None`` means ``lora_alpha = r``.
        num_init_batches: batches used by the Trainer callback to estimate the first step.
        svd_niter: ``None`` for an exact SVD, an int for ``torch.svd_lowrank`` (the paper's code: 10).
        gradient_init_done: set by leantune once B, R, A hold the gradient initialisation; a config with
            ``False`` cannot be used to train (it would start from a zero, gradient-free adapter).
    """

    lora_alpha: Optional[float] = field(default=None, metadata={"help": "Scale numerator; None means r."})
    num_init_batches: int = field(default=8, metadata={"help": "Batches for the first-step estimate (Trainer)."})
    svd_niter: Optional[int] = field(default=None, metadata={"help": "None: exact SVD; int: randomized SVD."})
    gradient_init_done: bool = field(default=False, metadata={"help": "Set by leantune after initialisation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.LORA_SB
        if self.num_init_batches <= 0:
            raise ValueError(f"num_init_batches must be positive, got {self.num_init_batches}.")


class LoraSBLayer(SandwichLayer):
    """LoRA-SB layer: B, R, A from the truncated SVD of the estimated first update of this layer."""

    prefix = "lorasb_"
    adapter_layer_names = ("lorasb_R",)
    other_param_names = ("lorasb_A", "lorasb_B", "r", "scaling")

    def initial_factors(
        self, adapter_name: str, config: LoraSBConfig, module_name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = config.r
        estimate = getattr(self.get_base_layer(), _INIT_ATTRIBUTE, None)
        if estimate is None:
            if not (config.gradient_init_done or config.inference_mode):
                raise ValueError(
                    f"LoRA-SB module {module_name!r} has no gradient initialisation. Create the model with "
                    "leantune.adapters.get_lora_sb_model(model, config, batches, lr=...) or train with "
                    "Trainer(callbacks=[LeanTuneCallback(adapter=config)]); plain get_peft_model() cannot "
                    "see your data."
                )
            # loading a trained adapter: the checkpoint overwrites these placeholders
            zeros = torch.zeros
            return zeros(self.out_features, r), zeros(r, r), zeros(r, self.in_features)
        u, s, vh = estimate
        if u.shape[1] != r:
            raise ValueError(f"{module_name}: the first-step estimate has rank {u.shape[1]}, the config asks r={r}.")
        delattr(self.get_base_layer(), _INIT_ATTRIBUTE)
        return u, torch.diag(s) / (self.scaling[adapter_name]), vh


class LoraSBModel(LowRankModel):
    """peft tuner that wraps target modules with :class:`LoraSBLayer`."""

    prefix = "lorasb_"
    tuner_layer_cls = LoraSBLayer


register_tuner(LeanTuneType.LORA_SB, LoraSBConfig, LoraSBModel)


def _default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise ValueError("The model returned no loss for a batch: include labels, or pass loss_fn=(model, batch) -> loss.")
    return out.loss


def targeted_modules(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """The modules ``config`` would adapt, resolved exactly as peft resolves them (incl. ``"all-linear"``)."""
    config = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) or not name:
            continue
        if check_target_module_exists(config, name):
            found[name] = module
    if not found:
        raise ValueError(f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}.")
    return found


@torch.no_grad()
def _first_step_factors(grad: torch.Tensor, lr: float, r: int, niter: Optional[int]) -> tuple[torch.Tensor, ...]:
    delta = -lr * torch.sign(grad.float())
    return truncated_svd(delta, r, niter)


def estimate_first_step(
    model: nn.Module,
    config: LoraSBConfig,
    batches: Iterable[Mapping[str, Any]],
    lr: float,
    loss_fn: Optional[Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]] = None,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Estimate each targeted weight's first AdamW step on ``batches`` and keep its rank-r SVD.

    The factors ``(U_r, S_r, Vh_r)`` of ``ΔW = −lr·sign(Σ ∇W)`` (in ``(out, in)`` layout) are attached to
    the modules for the next ``get_peft_model`` call and also returned. Parameters' ``requires_grad``
    flags and ``.grad`` fields are restored afterwards.
    """
    if lr <= 0:
        raise ValueError(f"lr (the learning rate of the first optimizer step) must be positive, got {lr}.")
    loss_fn = loss_fn or _default_loss
    modules = targeted_modules(model, config)
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, Conv1D)) or not module.weight.dtype.is_floating_point:
            raise TypeError(
                f"LoRA-SB needs full-precision gradients, but {name} is a {type(module).__name__}. Estimate the "
                "initialisation on the unquantized model, then quantize (see the README)."
            )
    flags = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for module in modules.values():
            module.weight.requires_grad_(True)
        model.train()
        seen = 0
        for batch in tqdm(batches, desc="LoRA-SB: estimating the first step", disable=not progress):
            loss_fn(model, batch).backward()
            seen += 1
        if seen == 0:
            raise ValueError("No batches were given to estimate LoRA-SB's initialisation.")
        factors = {}
        for name, module in modules.items():
            grad = module.weight.grad.T if isinstance(module, Conv1D) else module.weight.grad
            factors[name] = _first_step_factors(grad, lr, config.r, config.svd_niter)
            setattr(module, _INIT_ATTRIBUTE, factors[name])
    finally:
        for p, (requires_grad, grad) in flags.items():
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    return factors


def get_lora_sb_model(
    model: nn.Module,
    config: LoraSBConfig,
    batches: Iterable[Mapping[str, Any]],
    lr: float,
    loss_fn: Optional[Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]] = None,
    adapter_name: str = "default",
    progress: bool = True,
) -> PeftModel:
    """``get_peft_model`` for LoRA-SB: estimate the first step on ``batches`` and build the adapter from it.

    Args:
        model: the (full-precision) base model.
        config: a :class:`LoraSBConfig`.
        batches: a few training batches (dicts of tensors the model accepts, with labels).
        lr: the learning rate of the first optimizer step (with linear warmup: ``peak_lr / warmup_steps``).
        loss_fn: ``(model, batch) -> loss``; default ``model(**batch).loss``.
    """
    estimate_first_step(model, config, batches, lr, loss_fn, progress)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    config.gradient_init_done = True
    return peft_model
