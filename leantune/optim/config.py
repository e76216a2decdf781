"""``OptimizerConfig`` and ``build_optimizer``: a name of :data:`~leantune.optim.spec.OPTIMIZERS` to a configured
optimizer."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from torch import nn

from leantune._validation import check_bool, check_choice, check_int, check_names, check_number, is_number
from leantune.optim.base import MOMENT_POLICIES
from leantune.optim.offload import OFFLOAD_TARGETS, STEP_PLACES
from leantune.optim.param_groups import find_target_weights, make_param_groups
from leantune.optim.projector_kinds import PROJECTOR_KINDS
from leantune.optim.qgalore import quantize_weights
from leantune.optim.restarts import RESET_MOMENTS, low_rank_pairs
from leantune.optim.spec import OPTIMIZERS


@dataclass
class OptimizerConfig:
    """Low-rank optimizer settings.  ``None`` fields take the optimizer's default or, inside a Trainer, the
    ``TrainingArguments`` value (learning_rate, weight_decay, adam_beta1/2, adam_epsilon).

    ``rank``, ``update_proj_gap``, ``scale`` and ``projector`` default (None) to the named optimizer's
    :class:`OptimizerSpec`: GaLore's pretraining recipe (r 128, T 200, alpha 0.25) for the GaLore family, rank 1 and
    scale 128 for APOLLO-Mini, T 2000 for Conda.  For fine-tuning, LLaMA-Factory uses r 16, alpha 2.  alpha
    multiplies the learning rate of projected weights.  A rank larger than a targeted matrix's smaller side is
    refused when the optimizer is built.
    """

    name: str = "galore_adamw"
    rank: int | None = None
    update_proj_gap: int | None = None
    scale: float | None = None
    projector: str | None = None
    target_modules: str | Sequence[str] = "all-linear"
    layerwise: bool = False
    moment_policy: str = "keep"
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    reference_adam: bool = False
    max_grad_norm_per_param: float | None = None
    accumulation_steps: int = 1
    reset_every: int | None = None  # momentum reset every K optimizer steps (restarts.py)
    reset_moments: str = "all"
    recovery_steps: int = 10
    refactorize: bool = False  # rebalance LoRA/ALLoRA factor pairs at each reset
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"history_size": 4} or {"gamma": 1.01}
    offload: str | None = None  # "cpu": the state in host memory between updates (offload.py)
    offload_step: str = "auto"  # with offload: where updates run ("auto": where fewer bytes move; "device"; "host")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name: unknown low-rank optimizer {self.name!r}; choose one of "
                             f"{sorted(OPTIMIZERS)}.")
        if self.projector is not None:
            check_choice(self, "projector", PROJECTOR_KINDS)
        spec = OPTIMIZERS[self.name]
        check_int(self, "rank", minimum=1, optional=True)
        if self.rank is not None and spec.rank is None:
            raise ValueError(f"OptimizerConfig.rank: {self.name!r} has no rank ({spec.summary}); leave rank unset.")
        if self.rank is not None and spec.fixed_rank and self.rank != spec.rank:
            raise ValueError(f"OptimizerConfig.rank: {self.name!r} is rank {spec.rank} by definition; leave rank unset, "
                             "or use 'apollo_adamw' with optimizer_kwargs={'scale_type': 'tensor'} for a rank-"
                             f"{self.rank} tensor-wise APOLLO.")
        if self.projector is not None and spec.projector is None:
            raise ValueError(f"OptimizerConfig.projector: {self.name!r} has no projector choice; leave it unset.")
        check_int(self, "update_proj_gap", minimum=1, optional=True)
        check_number(self, "scale", optional=True)
        check_names(self, "target_modules", optional=False)
        check_bool(self, "layerwise")
        check_choice(self, "moment_policy", MOMENT_POLICIES)
        check_number(self, "lr", minimum=0, optional=True)
        check_number(self, "weight_decay", minimum=0, optional=True)
        check_number(self, "eps", minimum=0, optional=True)
        check_bool(self, "reference_adam")
        check_number(self, "max_grad_norm_per_param", minimum=0, strict=True, optional=True)
        check_int(self, "accumulation_steps", minimum=1)
        check_int(self, "reset_every", minimum=1, optional=True)
        check_choice(self, "reset_moments", RESET_MOMENTS)
        check_int(self, "recovery_steps", minimum=0)
        check_bool(self, "refactorize")
        if self.offload is not None:
            check_choice(self, "offload", OFFLOAD_TARGETS)
        check_choice(self, "offload_step", STEP_PLACES)
        if self.offload is None and self.offload_step != "auto":
            raise ValueError(f"OptimizerConfig.offload_step={self.offload_step!r} says where offloaded updates run; "
                             "set offload='cpu' as well (without offload every update runs on the device).")
        if self.refactorize and self.reset_every is None:
            raise ValueError("OptimizerConfig.refactorize: weight refactorization runs at each momentum reset; set "
                             "reset_every=K as well (the paper uses one cycle length for both).")
        if self.betas is not None:
            betas = self.betas
            if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1
                                                                                   for b in betas):
                raise ValueError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {betas!r}.")
            self.betas = tuple(betas)
        adam_only = [f for f in ("betas", "eps") if getattr(self, f) is not None] + (["reference_adam"]
                                                                                    if self.reference_adam else [])
        if adam_only and not spec.adam:
            raise ValueError(f"OptimizerConfig: {adam_only} are Adam settings; {self.name!r} is not Adam-based "
                             f"({spec.summary}). Leave them unset and pass {spec.cls.__name__}'s own options in "
                             f"optimizer_kwargs; accepted: {sorted(optimizer_options(spec.cls))}.")
        if not isinstance(self.optimizer_kwargs, dict) or not all(isinstance(k, str) for k in self.optimizer_kwargs):
            raise ValueError(f"OptimizerConfig.optimizer_kwargs must be a dict of option names, got "
                             f"{self.optimizer_kwargs!r}.")

    @classmethod
    def from_any(cls, config: "OptimizerConfig | str | dict[str, Any]") -> "OptimizerConfig":
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls(name=config)
        if isinstance(config, dict):
            return cls(**config)
        raise TypeError(f"Expected OptimizerConfig, a name or a dict, got {type(config).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_optimizer(model: nn.Module, config: OptimizerConfig | str | dict[str, Any]):
    """Build the configured optimizer over all trainable parameters of ``model`` (targets low-rank, rest plain)."""
    config = OptimizerConfig.from_any(config)
    spec = OPTIMIZERS[config.name]
    cls = spec.cls
    accepted = set(optimizer_options(cls)) | ({"int8_weights"} if spec.int8_weights else set())
    unknown = sorted(set(config.optimizer_kwargs) - accepted)
    if unknown:
        raise ValueError(f"OptimizerConfig.optimizer_kwargs: {unknown} are not options of {cls.__name__} "
                         f"({config.name!r}); accepted: {sorted(accepted)}")
    low_rank: dict[str, Any] = {
        "update_proj_gap": spec.update_proj_gap if config.update_proj_gap is None else config.update_proj_gap,
        "scale": spec.scale if config.scale is None else config.scale,
        "max_grad_norm_per_param": config.max_grad_norm_per_param,
    }
    if spec.projector is not None:
        low_rank.update(projector=config.projector or spec.projector, moment_policy=config.moment_policy)
    rank = (spec.rank if config.rank is None else config.rank) if spec.rank is not None else None
    kwargs: dict[str, Any] = {**spec.options, **config.optimizer_kwargs}
    kwargs.pop("int8_weights", None)
    if config.lr is not None:
        kwargs["lr"] = config.lr
    if config.weight_decay is not None:
        kwargs["weight_decay"] = config.weight_decay
    if spec.adam:
        if config.betas is not None:
            kwargs["betas"] = config.betas
        if config.eps is not None:
            kwargs["eps"] = config.eps
        if config.reference_adam:
            kwargs["reference_adam"] = True
    kwargs["max_grad_norm_per_param"] = config.max_grad_norm_per_param

    def make():
        groups = make_param_groups(model, target_modules=config.target_modules, rank=rank,
                                   weight_decay=config.weight_decay or 0.0, **low_rank)
        return cls(groups, layerwise=config.layerwise, accumulation_steps=config.accumulation_steps, **kwargs)

    optimizer = make()
    if quantize_model_weights(model, config):  # validated on the float model first: a refusal changes nothing
        optimizer.remove_hooks()
        optimizer = make()
    if config.offload is not None:
        optimizer.enable_offload(config.offload, step_on=config.offload_step)
    if config.reset_every is not None:
        pairs = None
        if config.refactorize:
            pairs = low_rank_pairs(model)
            if not pairs:
                raise ValueError("OptimizerConfig.refactorize: the model has no trainable low-rank factor pair B A "
                                 "(peft LoRA or ALLoRA) to refactorize; set refactorize=False.")
        optimizer.enable_restarts(config.reset_every, config.reset_moments, config.recovery_steps, pairs)
    return optimizer


def quantize_model_weights(model: nn.Module, config: OptimizerConfig) -> list[str]:
    """For an optimizer that trains INT8 weights (``OptimizerSpec.int8_weights``: Q-GaLore), turn the targeted linears
    of ``model`` into INT8 (once: a second call finds them converted) unless ``optimizer_kwargs["int8_weights"]`` is
    False; the module names converted."""
    if not OPTIMIZERS[config.name].int8_weights:
        return []
    flag = config.optimizer_kwargs.get("int8_weights", True)
    if not isinstance(flag, bool):
        raise ValueError(f"OptimizerConfig.optimizer_kwargs['int8_weights'] must be True or False, got {flag!r}")
    if not flag:
        return []
    return quantize_weights(model, list(find_target_weights(model, config.target_modules)))


def optimizer_options(cls: type) -> list[str]:
    """Keyword options of an optimizer class, its own and those of the classes it passes ``**kwargs`` on to."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith("torch"):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if param.kind is param.KEYWORD_ONLY or (param.kind is param.POSITIONAL_OR_KEYWORD and name not in
                                                     ("self", "params")):
                if not name.startswith("_") and name not in names and name != "defaults":
                    names.append(name)
    return names
