"""DyLoRA: one LoRA adapter trained so that every rank up to ``r`` works at inference.

Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free
Low-Rank Adaptation" (EACL 2023)::

    each training step: b ~ Uniform{r_min, …, r}   (one b for the whole model)
    h = W0 x + (α / b) · B[:, :b] A[:b, :] x
    "frozen" mode (the paper's code): only row b of A and column b of B get gradients this step,
    the lower-index components are used but detached.
    inference at any b' ≤ r: ΔW = (α / b') · B[:, :b'] A[:b', :]

Initialisation as LoRA (A kaiming-uniform, B = 0). The rank used outside training is ``eval_rank``
(default ``r``); change it with :meth:`DyLoRAModel.set_eval_rank` — merge and export use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from leantune._validation import check_bool, check_int, check_number

from .low_rank import LowRankConfig, LowRankLayer, LowRankModel
from .nola import derive_seed
from .registration import LeanTuneType, register_tuner


@dataclass
class DyLoRAConfig(LowRankConfig):
    """Configuration of a DyLoRA adapter.

    Args:
        r: the maximal rank (parameters as LoRA at rank r).
        r_min: smallest rank sampled in training.
        lora_alpha: α; the scale at rank b is α / b.
        frozen: the paper's mode, only the b-th component trains at sampled rank b.
        eval_rank: rank used in eval mode, for merging and for export (``None``: r).
        seed: seed of the rank sampler (its own generator; the global RNG is not touched).
        init_weights: ``True`` (A kaiming-uniform, B = 0: identity at start) or ``False`` (B random too, for tests).

    Training budget: at sampled rank b the scale is α/b, up to r× LoRA's α/r (b = 1), and in ``frozen`` mode each
    component trains on about 1/(r − r_min + 1) of the steps. Choose DyLoRA when one adapter must serve several
    ranks; at LoRA's learning rate and step count it can be unstable (docs/results/quality.md: at 2e-3, MiniLM,
    200 steps, one seed in three fell to 43% and a 600-step run to chance, against LoRA's 58%), at a quarter of that
    rate it underfits — give it a lower rate and more steps than LoRA, or ``frozen=False`` (steadier).
    """

    r_min: int = field(default=1, metadata={"help": "Smallest sampled rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "α; scale α/b at rank b."})
    frozen: bool = field(default=True, metadata={"help": "Train only the b-th component per step."})
    eval_rank: Optional[int] = field(default=None, metadata={"help": "Rank outside training (None: r)."})
    seed: int = field(default=0, metadata={"help": "Seed of the rank sampler."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.DYLORA
        check_int(self, "r_min", minimum=1, maximum=self.r)
        check_int(self, "eval_rank", minimum=1, maximum=self.r, optional=True)
        check_number(self, "lora_alpha", minimum=0, strict=True)
        check_bool(self, "frozen")
        check_int(self, "seed", minimum=0)


class DyLoRALayer(LowRankLayer):
    """DyLoRA layer: LoRA factors used truncated at the sampled (training) or chosen (eval) rank."""

    adapter_layer_names = ("dylora_A", "dylora_B")
    other_param_names = ("r", "lora_alpha", "frozen", "eval_rank", "sampled_rank")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DyLoRAConfig, module_name: str) -> None:
        super().__init__(base_layer)
        self.dylora_A = nn.ParameterDict({})
        self.dylora_B = nn.ParameterDict({})
        self.lora_alpha: dict[str, float] = {}
        self.frozen: dict[str, bool] = {}
        self.eval_rank: dict[str, int] = {}
        self.sampled_rank: dict[str, Optional[int]] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: DyLoRAConfig, module_name: str) -> None:
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.frozen[adapter_name] = config.frozen
        self.eval_rank[adapter_name] = config.eval_rank or r
        self.sampled_rank[adapter_name] = None
        a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, r)
        if config.init_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.dylora_A[adapter_name] = nn.Parameter(a)
        self.dylora_B[adapter_name] = nn.Parameter(b)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def current_rank(self, adapter: str) -> int:
        """The sampled rank in training (if one was sampled), else ``eval_rank``."""
        sampled = self.sampled_rank[adapter]
        return sampled if (self.training and sampled is not None) else self.eval_rank[adapter]

    def truncated_factors(self, adapter: str, b: int, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``((α/b) B[:, :b], A[:b])``; in frozen mode components below b are detached."""
        a, bmat = self.dylora_A[adapter][:b], self.dylora_B[adapter][:, :b]
        if frozen and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1 :]], dim=0)
            bmat = torch.cat([bmat[:, : b - 1].detach(), bmat[:, b - 1 :]], dim=1)
        return bmat * (self.lora_alpha[adapter] / b), a

    def lowrank_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.truncated_factors(adapter, self.eval_rank[adapter], frozen=False)

    @torch.no_grad()
    def absorb_lowrank(self, adapter: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """ΔW = (α/b) B[:, :b] A[:b] at the evaluation rank b = r; SVD factors come largest first, so every
        truncation b' < r keeps the best rank-b' part of ``left @ right``."""
        rank = self.eval_rank[adapter]
        if rank != self.r[adapter]:
            raise ValueError(f"DyLoRA: set_eval_rank({self.r[adapter]}) before a LoftQ initialisation (it is {rank})")
        self.dylora_B[adapter].copy_(left * (rank / self.lora_alpha[adapter]))
        self.dylora_A[adapter].copy_(right)

    def forward_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        frozen = self.training and self.frozen[adapter] and self.sampled_rank[adapter] is not None
        return self.truncated_factors(adapter, self.current_rank(adapter), frozen)


class DyLoRAModel(LowRankModel):
    """peft tuner for DyLoRA; samples one rank per training forward for all its layers."""

    prefix = "dylora_"
    tuner_layer_cls = DyLoRALayer

    def _layers(self) -> list[DyLoRALayer]:
        return [m for m in self.model.modules() if isinstance(m, DyLoRALayer)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank_generators: dict[str, torch.Generator] = {}  # one per adapter, seeded from its config

    def sample_rank(self) -> dict[str, int]:
        """Draw ``b ~ Uniform{r_min..r}`` for every active adapter and give it to all layers."""
        ranks = {}
        for adapter in self.active_adapters:
            config = self.peft_config[adapter]
            gen = self.rank_generators.setdefault(adapter, torch.Generator().manual_seed(config.seed))
            ranks[adapter] = int(torch.randint(config.r_min, config.r + 1, (1,), generator=gen))
        for layer in self._layers():
            for adapter, b in ranks.items():
                if adapter in layer.sampled_rank:
                    layer.sampled_rank[adapter] = b
        return ranks

    def reseed(self, step: int) -> None:
        """Restart every adapter's rank sampler from ``(seed, step)``: a run resumed at ``step`` then draws the same
        ranks as the uninterrupted one (``LeanTuneCallback`` calls this at every optimizer step)."""
        for adapter in self.active_adapters:
            seed = derive_seed(self.peft_config[adapter].seed, "dylora-step", step)
            self.rank_generators[adapter] = torch.Generator().manual_seed(seed)

    def before_train_step(self, step: int) -> None:
        self.reseed(step)

    def set_eval_rank(self, rank: int, adapter_name: Optional[str] = None) -> None:
        """Use rank ``rank`` outside training, for merging and for export (any ``1 <= rank <= r``)."""
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        if not 1 <= rank <= config.r:
            raise ValueError(f"rank must be in [1, {config.r}] for adapter {adapter_name!r}, got {rank}.")
        config.eval_rank = rank
        for layer in self._layers():
            if adapter_name in layer.eval_rank:
                layer.eval_rank[adapter_name] = rank

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.model.training:
            self.sample_rank()
        return self.model(*args, **kwargs)  # through __call__: FSDP2 unshards its root in the pre-forward hook


register_tuner(LeanTuneType.DYLORA, DyLoRAConfig, DyLoRAModel)
