"""ALLoRA: LoRA without dropout and scaling, with a row-wise adaptive learning rate.

Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws" (arXiv 2410.09692)::

    h = W0 x + B A x                          (no α/r scaling, no dropout; A kaiming, B = 0 as in LoRA)
    ΔW = B A,   c_i = 1 / sqrt(‖ΔW_{i,:}‖₂ + 1/η²)        one coefficient per output row i
    ∂L/∂ΔW  ←  C · ∂L/∂ΔW,   C = diag(c)     so  ∇_B = C G Aᵀ,  ∇_A = Bᵀ C G   (G = ∂L/∂ΔW)
    ∂L/∂x is left unscaled.

At init (B = 0) every ``c_i = η``: small updates learn η× faster; rows that moved far slow down like
``1/√‖row‖``. No official code exists, so the two choices the paper leaves open are options:
``norm_of="delta_w_row"`` (default; the formula above) or ``"param_row"`` (each of A and B scales its
own gradient rows by ``1/sqrt(‖row‖ + 1/η²)`` of its own rows), and ``squared`` (use ‖·‖² inside the
root; default ``False``, as in every third-party implementation). The coefficients are constants in
backward (computed without gradient), which is what "scaling the gradients" means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from leantune._utils import scale_columns
from leantune._validation import check_bool, check_choice, check_number

from .low_rank import LowRankConfig, LowRankLayer, LowRankModel
from .registration import LeanTuneType, register_tuner


@dataclass
class ALLoRAConfig(LowRankConfig):
    """Configuration of an ALLoRA adapter.

    Args:
        r: rank of ``B A``.
        eta: η, the gradient boost at ΔW = 0 (paper sweeps η² ∈ {1, 2, 4}; default 2).
        norm_of: ``"delta_w_row"`` (rows of ΔW = BA scale both gradients) or ``"param_row"``.
        squared: use the squared row norm inside the square root.
        init_weights: ``True`` (A kaiming-uniform, B = 0: identity at start, as LoRA) or ``False`` (B kaiming-uniform
            too: a non-identity adapter, for tests).
    """

    eta: float = field(default=2.0, metadata={"help": "Gradient boost at ΔW = 0."})
    norm_of: Literal["delta_w_row", "param_row"] = field(default="delta_w_row", metadata={"help": "Which norm."})
    squared: bool = field(default=False, metadata={"help": "Square the norm inside the root."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.ALLORA
        check_number(self, "eta", minimum=0, strict=True)
        check_choice(self, "norm_of", ("delta_w_row", "param_row"))
        check_bool(self, "squared")


def adaptive_coefficient(row_norm: torch.Tensor, eta: float, squared: bool) -> torch.Tensor:
    """``c = 1 / sqrt(n + 1/η²)`` with ``n = ‖row‖`` (or ``‖row‖²`` when ``squared``)."""
    n = row_norm.square() if squared else row_norm
    return torch.rsqrt(n + 1.0 / eta**2)


class _ALLoRAFunction(torch.autograd.Function):
    """``y = (x Aᵀ) Bᵀ``; backward scales B's gradient rows by ``c_b`` and A's by ``c_a``-weighted terms.

    ``c_out`` (out,) scales the output gradient seen by *both* parameters (the ``delta_w_row`` rule);
    ``c_b`` (out,) and ``c_a`` (r,) scale the rows of the parameter gradients (the ``param_row`` rule).
    Unused ones are ``None``. The input gradient uses the unscaled output gradient.
    """

    @staticmethod
    def forward(ctx, x, a, b, c_out, c_a, c_b, input_scale=None):  # type: ignore[override]
        a_eff = a if input_scale is None else scale_columns(a, input_scale)  # a folded norm's γ (see LowRankLayer)
        h = nn.functional.linear(x, a_eff)
        ctx.save_for_backward(x, h, a, b, c_out, c_a, c_b, input_scale)
        return nn.functional.linear(h, b)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, h, a, b, c_out, c_a, c_b, input_scale = ctx.saved_tensors
        a = a if input_scale is None else scale_columns(a, input_scale)
        grad_h = grad_y @ b  # unscaled: feeds dL/dx
        grad_x = grad_h @ a if ctx.needs_input_grad[0] else None
        g = grad_y if c_out is None else grad_y * c_out
        g2 = g.reshape(-1, g.shape[-1])
        grad_b = g2.T @ h.reshape(-1, h.shape[-1])
        grad_h_scaled = grad_h if c_out is None else g @ b
        grad_a = grad_h_scaled.reshape(-1, a.shape[0]).T @ x.reshape(-1, x.shape[-1])
        if c_b is not None:
            grad_b = grad_b * c_b[:, None]
        if c_a is not None:
            grad_a = grad_a * c_a[:, None]
        if input_scale is not None:
            grad_a = scale_columns(grad_a, input_scale)  # chain rule through A diag γ
        return grad_x, grad_a, grad_b, None, None, None, None


class ALLoRALayer(LowRankLayer):
    """ALLoRA layer: ``ΔW = B A`` with the adaptive row-wise gradient scaling in backward."""

    adapter_layer_names = ("allora_A", "allora_B")
    other_param_names = ("r", "eta", "norm_of", "squared")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ALLoRAConfig, module_name: str) -> None:
        super().__init__(base_layer)
        self.allora_A = nn.ParameterDict({})
        self.allora_B = nn.ParameterDict({})
        self.eta: dict[str, float] = {}
        self.norm_of: dict[str, str] = {}
        self.squared: dict[str, bool] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def factor_pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(adapter, self.allora_B[adapter], a) for adapter, a in self.allora_A.items()
                if a.requires_grad and self.allora_B[adapter].requires_grad]

    def update_layer(self, adapter_name: str, config: ALLoRAConfig, module_name: str) -> None:
        r = config.r
        self.r[adapter_name] = r
        self.eta[adapter_name] = config.eta
        self.norm_of[adapter_name] = config.norm_of
        self.squared[adapter_name] = config.squared
        a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft's LoRA, so B = 0 gives ΔW = 0
        b = torch.zeros(self.out_features, r)
        if config.init_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.allora_A[adapter_name] = nn.Parameter(a)
        self.allora_B[adapter_name] = nn.Parameter(b)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def lowrank_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.allora_B[adapter], self.allora_A[adapter]

    @torch.no_grad()
    def absorb_lowrank(self, adapter: str, left: torch.Tensor, right: torch.Tensor) -> None:
        self.allora_B[adapter].copy_(left)  # ΔW = B A, no scale
        self.allora_A[adapter].copy_(right)

    @torch.no_grad()
    def coefficients(self, adapter: str) -> tuple[Optional[torch.Tensor], ...]:
        """``(c_out, c_a, c_b)`` for the configured rule (see :class:`_ALLoRAFunction`)."""
        dtype = torch.promote_types(self.allora_A[adapter].dtype, torch.float32)  # norms in fp32 or better
        a, b = self.allora_A[adapter].to(dtype), self.allora_B[adapter].to(dtype)
        eta, squared = self.eta[adapter], self.squared[adapter]
        if self.norm_of[adapter] == "delta_w_row":
            # ‖(BA)_i‖² = B_i (A Aᵀ) B_iᵀ: no out×in product needed
            row_sq = ((b @ (a @ a.T)) * b).sum(dim=1).clamp_min(0)
            c_out = adaptive_coefficient(row_sq.sqrt(), eta, squared)
            return c_out.to(self.allora_B[adapter].dtype), None, None
        c_a = adaptive_coefficient(a.norm(dim=1), eta, squared).to(a.dtype)
        c_b = adaptive_coefficient(b.norm(dim=1), eta, squared).to(b.dtype)
        return None, c_a, c_b

    def forward_factors(self, adapter: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return None if torch.is_grad_enabled() else self.lowrank_factors(adapter)  # training needs the custom backward

    def adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        a, b = self.allora_A[adapter], self.allora_B[adapter]
        if not torch.is_grad_enabled():
            return nn.functional.linear(self.input_linear(x, a), b)
        # a folded norm's γ enters through input_scale(); the coefficients still come from ΔW = B A itself
        return _ALLoRAFunction.apply(x, a, b, *self.coefficients(adapter), self.input_scale())


class ALLoRAModel(LowRankModel):
    """peft tuner that wraps target modules with :class:`ALLoRALayer`."""

    prefix = "allora_"
    tuner_layer_cls = ALLoRALayer


register_tuner(LeanTuneType.ALLORA, ALLoRAConfig, ALLoRAModel)
