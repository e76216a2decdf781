"""``OptimizerConfig`` and ``build_optimizer``: one place that maps a name to a configured optimizer."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from torch import nn

from leantune._validation import check_bool, check_choice, check_int, check_names, check_number, is_number
from leantune.optim.base import MOMENT_POLICIES
from leantune.optim.fira import FiraAdamW
from leantune.optim.galore_adafactor import GaLoreAdafactor
from leantune.optim.galore_adamw import GaLoreAdamW
from leantune.optim.galore_adamw8bit import GaLoreAdamW8bit
from leantune.optim.natural_galore import NaturalGaLoreAdamW
from leantune.optim.param_groups import make_param_groups
from leantune.optim.projectors import PROJECTOR_KINDS

#: name -> (class, default projector, default scale alpha)
OPTIMIZERS: dict[str, tuple[type, str, float]] = {
    "galore_adamw": (GaLoreAdamW, "svd", 0.25),
    "galore_adamw8bit": (GaLoreAdamW8bit, "svd", 0.25),
    "galore_adafactor": (GaLoreAdafactor, "svd", 0.25),
    "fira_adamw": (FiraAdamW, "svd", 0.25),
    "natural_galore_adamw": (NaturalGaLoreAdamW, "svd", 0.25),
    "dct_adamw": (GaLoreAdamW, "dct", 1.0),  # DCT-AdamW: no alpha in the reference
    "dct_fira_adamw": (FiraAdamW, "dct", 1.0),
    "rsvd_galore_adamw": (GaLoreAdamW, "rsvd", 0.25),
}


@dataclass
class OptimizerConfig:
    """Low-rank optimizer settings.  ``None`` fields take the optimizer's default or, inside a Trainer, the
    ``TrainingArguments`` value (learning_rate, weight_decay, adam_beta1/2, adam_epsilon).

    Defaults follow GaLore's pretraining recipe (r 128, T 200, alpha 0.25).  For fine-tuning, LLaMA-Factory uses
    r 16, alpha 2.  alpha multiplies the learning rate of projected weights.
    """

    name: str = "galore_adamw"
    rank: int = 128
    update_proj_gap: int = 200
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
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"history_size": 4} or {"gamma": 1.01}

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name: unknown low-rank optimizer {self.name!r}; choose one of "
                             f"{sorted(OPTIMIZERS)}.")
        if self.projector is not None:
            check_choice(self, "projector", PROJECTOR_KINDS)
        check_int(self, "rank", minimum=1)
        check_int(self, "update_proj_gap", minimum=1)
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
        if self.betas is not None:
            betas = self.betas
            if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1
                                                                                   for b in betas):
                raise ValueError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {betas!r}.")
            self.betas = tuple(betas)
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
    cls, default_projector, default_scale = OPTIMIZERS[config.name]
    groups = make_param_groups(
        model,
        target_modules=config.target_modules,
        rank=config.rank,
        update_proj_gap=config.update_proj_gap,
        scale=default_scale if config.scale is None else config.scale,
        projector=config.projector or default_projector,
        weight_decay=config.weight_decay or 0.0,
        moment_policy=config.moment_policy,
        max_grad_norm_per_param=config.max_grad_norm_per_param,
    )
    kwargs: dict[str, Any] = dict(config.optimizer_kwargs)
    if config.lr is not None:
        kwargs["lr"] = config.lr
    if config.weight_decay is not None:
        kwargs["weight_decay"] = config.weight_decay
    if cls is not GaLoreAdafactor:
        if config.betas is not None:
            kwargs["betas"] = config.betas
        if config.eps is not None:
            kwargs["eps"] = config.eps
        if config.reference_adam:
            kwargs["reference_adam"] = True
    kwargs["max_grad_norm_per_param"] = config.max_grad_norm_per_param
    unknown = sorted(set(config.optimizer_kwargs) - set(optimizer_options(cls)))
    if unknown:
        raise ValueError(f"OptimizerConfig.optimizer_kwargs: {unknown} are not options of {cls.__name__} "
                         f"({config.name!r}); accepted: {sorted(optimizer_options(cls))}")
    return cls(groups, layerwise=config.layerwise, accumulation_steps=config.accumulation_steps, **kwargs)


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
