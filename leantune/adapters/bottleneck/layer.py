"""The bottleneck adapter module and the peft tuner layer that applies it to a sublayer's output.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019); Pfeiffer et al.,
"AdapterFusion" (EACL 2021); Compacter (Karimi Mahabadi et al., NeurIPS 2021)::

    y = Linear(x)                                 the wrapped layer produces a sublayer's output
    y ← y + Σ_{a ∈ active} scaling · U_a f(D_a y)  D_a: hidden → m, U_a: m → hidden, m = hidden / rf
    Compacter: D_a, U_a are PHM layers (``H = Σ_i S_i ⊗ W_i``) sharing one rule S per adapter name

With several active adapters each sees the same ``y`` and their outputs add (parallel composition). The
map is nonlinear in the input, so it cannot be folded into the wrapped weight: merging raises.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from .config import BottleneckConfig
from .phm import PHMLinear

MERGE_REFUSAL = (
    "Bottleneck/Compacter adapters compute y + U f(D y) with a nonlinearity f, which no weight matrix can "
    "represent, so they cannot be merged into the base layer. Keep the adapter unmerged (it adds one small "
    "MLP per sublayer), or use a linear method (LoRA, NOLA, LoRA-XS) if you need merging."
)


class SharedRules:
    """A reference to the tuner-level ``ParameterDict`` of shared PHM rules, deliberately *not* a submodule:
    the rule is registered (and saved) once, on the tuner, not once per layer."""

    def __init__(self, rules: nn.ParameterDict) -> None:
        self.rules = rules

    def get(self, adapter: str) -> Optional[torch.Tensor]:
        return self.rules[adapter] if adapter in self.rules else None


class BottleneckAdapter(nn.Module):
    """``h ↦ scaling · U f(D h)`` (the residual is added by :class:`BottleneckLayer`)."""

    def __init__(self, hidden: int, config: BottleneckConfig, module_name: str) -> None:
        super().__init__()
        bottleneck = int(hidden // config.reduction_factor)
        if bottleneck < 1:
            raise ValueError(
                f"{module_name}: hidden size {hidden} / reduction_factor {config.reduction_factor} leaves no "
                "bottleneck unit; lower reduction_factor."
            )
        self.hidden, self.bottleneck, self.scaling = hidden, bottleneck, config.scaling
        self.act = ACT2FN[config.non_linearity]
        if config.phm:
            kwargs = dict(n=config.phm_dim, rank=config.phm_rank, own_rule=not config.shared_phm_rule)
            self.down = PHMLinear(hidden, bottleneck, name=f"{module_name} (down projection)", **kwargs)
            self.up = PHMLinear(bottleneck, hidden, name=f"{module_name} (up projection)", **kwargs)
            if config.init_weights == "zeros_up":
                with torch.no_grad():
                    (self.up.W if self.up.rank is None else self.up.W_right).zero_()
            elif config.init_weights is False:  # non-identity, for tests
                with torch.no_grad():
                    for p in self.parameters():
                        p.normal_(0.0, 0.1)
        else:
            self.down, self.up = nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden)
            self._init_linear(config.init_weights)

    @torch.no_grad()
    def _init_linear(self, scheme: bool | str) -> None:
        for layer in (self.down, self.up):
            nn.init.zeros_(layer.bias)
            if scheme is True or scheme == "bert":
                nn.init.normal_(layer.weight, std=0.02)
            elif scheme == "houlsby":
                nn.init.trunc_normal_(layer.weight, std=1e-2, a=-2e-2, b=2e-2)
            elif scheme is False:  # clearly non-identity, for tests
                nn.init.normal_(layer.weight, std=0.1)
                nn.init.normal_(layer.bias, std=0.1)
        if scheme == "zeros_up":  # down keeps nn.Linear's kaiming-uniform init
            nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor, rule: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(self.down, PHMLinear):
            return self.scaling * self.up(self.act(self.down(h, rule)), rule)
        return self.scaling * self.up(self.act(self.down(h)))


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps the Linear/Conv1D producing a sublayer output and adds the active adapters' outputs to it."""

    adapter_layer_names = ("bottleneck_adapter",)
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: BottleneckConfig,
        module_name: str,
        shared_rules: SharedRules,
    ) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"Bottleneck adapters wrap the nn.Linear/Conv1D producing a sublayer output, but {module_name!r} is "
                f"a {type(base).__name__}. Point target_modules at that projection instead."
            )
        self.in_features, self.out_features = _get_in_out_features(base)
        self.shared_rules = shared_rules
        self.bottleneck_adapter = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        self.bottleneck_adapter[adapter_name] = BottleneckAdapter(self.out_features, config, module_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        delta = None
        for adapter in self.active_adapters:
            if adapter not in self.bottleneck_adapter:
                continue
            module = self.bottleneck_adapter[adapter]
            out = module(result.to(module.up.bias.dtype), self.shared_rules.get(adapter)).to(result.dtype)
            delta = out if delta is None else delta + out
        return result if delta is None else result + delta

    # --- merging is impossible for a nonlinear adapter --------------------------------------------------------------
    def _refuse_merge(self) -> None:
        raise ValueError(MERGE_REFUSAL)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._refuse_merge()

    def unmerge(self) -> None:  # nothing can have been merged
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        self._refuse_merge()

    def __repr__(self) -> str:
        return f"bottleneck.{super().__repr__()}"
