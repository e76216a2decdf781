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

from leantune._utils import batch_loss
from leantune._validation import check_bool, check_int, check_number

from .lora_xs import SandwichLayer, truncated_svd
from .low_rank import LowRankConfig, LowRankModel
from .registration import LeanTuneType, register_tuner


@dataclass
class LoraSBConfig(LowRankConfig):
    """Configuration of a LoRA-SB adapter.

    Args:
        r: rank; each adapted matrix trains ``r²`` parameters.
        lora_alpha: scale numerator, ``s = lora_alpha / r``; the output at init does not depend on it
            (``R_init = Σ_r / s``). ``None`` means ``lora_alpha = r``.
        num_init_batches: batches used by the Trainer callback to estimate the first step.
        svd_niter: ``None`` for an exact SVD, an int for ``torch.svd_lowrank`` (the paper's code: 10).
        init_weights: ``True`` (the method: the gradient initialisation, which needs data — see above) or ``False``
            (random orthonormal B, A and R ~ N(0, 0.1²): a non-identity adapter that ``get_peft_model`` builds
            without data, for tests).
        gradient_init_done: set by leantune once B, R, A hold the gradient initialisation (then layers are built
            as placeholders the estimate or a checkpoint fills); a config with ``False`` cannot be passed to
            ``get_peft_model`` directly (it would start from a zero, gradient-free adapter).
    """

    lora_alpha: Optional[float] = field(default=None, metadata={"help": "Scale numerator; None means r."})
    num_init_batches: int = field(default=8, metadata={"help": "Batches for the first-step estimate (Trainer)."})
    svd_niter: Optional[int] = field(default=None, metadata={"help": "None: exact SVD; int: randomized SVD."})
    gradient_init_done: bool = field(default=False, metadata={"help": "Set by leantune after initialisation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.LORA_SB
        check_number(self, "lora_alpha", minimum=0, strict=True, optional=True)
        check_int(self, "num_init_batches", minimum=1)
        check_int(self, "svd_niter", minimum=0, optional=True)
        check_bool(self, "gradient_init_done")

    def init_batches_needed(self) -> int:
        return 0 if self.gradient_init_done else self.num_init_batches

    def placeholder_init(self) -> None:
        self.gradient_init_done = True

    def inject_from_batches(self, model: nn.Module, batches: list, lr: float, loss_fn: Callable,
                            adapter_name: str = "default") -> PeftModel:
        return inject_lora_sb(model, self, estimate_first_step(model, self, batches, lr, loss_fn), adapter_name)


class LoraSBLayer(SandwichLayer):
    """LoRA-SB layer: B, R, A from the truncated SVD of the estimated first update of this layer."""

    prefix = "lorasb_"
    adapter_layer_names = ("lorasb_R",)
    other_param_names = ("lorasb_A", "lorasb_B", "r", "scaling")

    def initial_factors(
        self, adapter_name: str, config: LoraSBConfig, module_name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = config.r
        if config.init_weights is False:  # random, non-identity (tests): orthonormal B, A and a random R
            b = torch.linalg.qr(torch.randn(self.out_features, r)).Q
            a = torch.linalg.qr(torch.randn(self.in_features, r)).Q.T
            return b, torch.randn(r, r) * 0.1, a
        if not (config.gradient_init_done or config.inference_mode):
            raise ValueError(
                f"LoRA-SB module {module_name!r} has no gradient initialisation. Create the model with "
                "leantune.adapters.get_lora_sb_model(model, config, batches, lr=...) or train with "
                "LeanTuneCallback(adapter=config).setup(trainer); plain get_peft_model() cannot see your data."
            )
        # placeholders: set_first_step (or a checkpoint) writes B, R, A
        return torch.zeros(self.out_features, r), torch.zeros(r, r), torch.zeros(r, self.in_features)

    @torch.no_grad()
    def set_first_step(self, adapter_name: str, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Write ``B = U_r``, ``R = Σ_r / s``, ``A = V_rᵀ`` from the estimated first step's rank-r SVD."""
        u, s, vh = factors
        b_dict, r_dict, a_dict = self.factor_dicts()
        if u.shape != b_dict[adapter_name].shape or vh.shape != a_dict[adapter_name].shape:
            raise ValueError(f"LoRA-SB: the first-step estimate has factors {tuple(u.shape)} / {tuple(vh.shape)}, the "
                             f"layer needs {tuple(b_dict[adapter_name].shape)} / {tuple(a_dict[adapter_name].shape)} "
                             "(was it estimated with another r or on another model?)")
        b_dict[adapter_name].copy_(u)
        a_dict[adapter_name].copy_(vh)
        r_dict[adapter_name].copy_(torch.diag(s) / self.scaling[adapter_name])


class LoraSBModel(LowRankModel):
    """peft tuner that wraps target modules with :class:`LoraSBLayer`."""

    prefix = "lorasb_"
    tuner_layer_cls = LoraSBLayer


register_tuner(LeanTuneType.LORA_SB, LoraSBConfig, LoraSBModel)


def targeted_modules(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """The modules ``config`` would adapt, resolved exactly as peft resolves them (incl. ``"all-linear"``)."""
    config = copy.deepcopy(config)
    if config.target_modules is None:  # peft's default targets for this architecture, as get_peft_model resolves them
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = LoraSBModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise ValueError(f"LoraSBConfig.target_modules is None and peft has no default targets for model_type="
                             f"{model_type!r}; pass target_modules.")
        config.target_modules = set(defaults)
    config = _maybe_include_all_linear_layers(config, model)
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

    Returns ``{module name: (U_r, S_r, Vh_r)}`` of ``ΔW = −lr·sign(Σ ∇W)`` (in ``(out, in)`` layout), the input
    of :func:`inject_lora_sb`. Parameters' ``requires_grad`` flags and ``.grad`` fields are restored afterwards.
    """
    if lr <= 0:
        raise ValueError(f"lr (the learning rate of the first optimizer step) must be positive, got {lr}.")
    loss_fn = loss_fn or batch_loss
    modules = targeted_modules(model, config)
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, Conv1D)) or not module.weight.dtype.is_floating_point:
            raise TypeError(
                f"LoRA-SB needs full-precision gradients, but {name} is a {type(module).__name__}. Estimate the "
                "initialisation on the unquantized model, then quantize (docs/methods/adapters.md)."
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
    finally:
        for p, (requires_grad, grad) in flags.items():
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    return factors


def inject_lora_sb(model: nn.Module, config: LoraSBConfig,
                   factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   adapter_name: str = "default") -> PeftModel:
    """``get_peft_model`` for LoRA-SB from a first-step estimate (the output of :func:`estimate_first_step`).

    The layers are built as placeholders and each receives its factors explicitly; a targeted module without an
    estimate (or with mismatched shapes) raises and leaves ``config`` as it was.
    """
    missing = sorted(set(targeted_modules(model, config)) - set(factors))
    if missing:
        raise ValueError(f"LoRA-SB: no first-step estimate for {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                         "estimate with the same config and model (estimate_first_step).")
    was_done = config.gradient_init_done
    config.gradient_init_done = True
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraSBLayer) and adapter_name in module.r:
                module.set_first_step(adapter_name, factors[name])
    except BaseException:
        config.gradient_init_done = was_done
        raise
    return peft_model


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
    factors = estimate_first_step(model, config, batches, lr, loss_fn, progress)
    return inject_lora_sb(model, config, factors, adapter_name)
