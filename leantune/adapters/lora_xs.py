"""LoRA-XS: a trainable r×r matrix between frozen singular vectors of the pretrained weight.

Bałazy et al., "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters" (arXiv 2405.17604)::

    ΔW = s · B R A,      W0 ≈ U_r Σ_r V_rᵀ (truncated SVD of W0, W0 ∈ R^{out×in})
    B = U_r  (out×r, frozen),   A = Σ_r V_rᵀ  (r×in, frozen; Σ is absorbed into A),
    R ∈ R^{r×r} trainable, R ~ N(0, σ=1e-5) so the model starts at ≈ W0,   s = α / r.

W0 itself is not modified. Only ``r²`` parameters train per adapted matrix. B and A are stored in the
checkpoint (they are the SVD of *this* base model's weights), so a saved adapter reloads exactly and a
base with other weights is caught on load by its shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from leantune._validation import check_int, check_number

from .low_rank import LowRankConfig, LowRankLayer, LowRankModel, base_weight_out_in
from .registration import LeanTuneType, register_tuner


@dataclass
class LoraXSConfig(LowRankConfig):
    """Configuration of a LoRA-XS adapter.

    Args:
        r: rank; each adapted matrix trains ``r²`` parameters.
        lora_alpha: scale numerator, ``s = lora_alpha / r``; ``None`` means ``lora_alpha = r`` (s = 1).
        init_weights: ``True`` / ``"svd"`` (the method: B, A from the truncated SVD of W0, R ≈ 0), ``"random"``
            (the paper's no-SVD ablation: kaiming-uniform A and B, R ≈ 0) or ``False`` (SVD factors and a random
            R ~ N(0, 0.1²): a non-identity adapter, for tests).
        r_init_std: standard deviation of R's normal initialisation (paper code: 1e-5).
        svd_niter: ``None`` for an exact SVD; an int for ``torch.svd_lowrank`` with that many power
            iterations (faster on very large matrices, approximate).
    """

    lora_alpha: Optional[float] = field(default=None, metadata={"help": "Scale numerator; None means r."})
    init_weight_options: ClassVar[tuple] = (True, False, "svd", "random")
    r_init_std: float = field(default=1e-5, metadata={"help": "Std of R's normal init."})
    svd_niter: Optional[int] = field(default=None, metadata={"help": "None: exact SVD; int: randomized SVD."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.LORA_XS
        check_number(self, "lora_alpha", minimum=0, strict=True, optional=True)
        check_number(self, "r_init_std", minimum=0)
        check_int(self, "svd_niter", minimum=0, optional=True)


def truncated_svd(weight: torch.Tensor, r: int, niter: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """``U_r, S_r, Vh_r`` of a 2-D tensor in float32 (exact, or randomized when ``niter`` is given)."""
    w = weight.float()
    if r > min(w.shape):
        raise ValueError(f"rank r={r} exceeds the smallest dimension of a {tuple(w.shape)} weight.")
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    u, s, v = torch.svd_lowrank(w, q=min(r + 8, min(w.shape)), niter=niter)
    return u[:, :r], s[:r], v[:, :r].T


class SandwichLayer(LowRankLayer):
    """``ΔW = s · B R A`` with frozen ``B``, ``A`` (buffers) and trainable ``R``; shared by LoRA-XS and LoRA-SB.

    Subclasses set ``prefix`` and implement ``initial_factors`` returning ``(B, R, A)``.
    """

    prefix: ClassVar[str]

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LowRankConfig, module_name: str) -> None:
        super().__init__(base_layer)
        setattr(self, f"{self.prefix}R", nn.ParameterDict({}))
        setattr(self, f"{self.prefix}A", BufferDict({}, persistent=True))
        setattr(self, f"{self.prefix}B", BufferDict({}, persistent=True))
        self.scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def factor_dicts(self) -> tuple[BufferDict, nn.ParameterDict, BufferDict]:
        return getattr(self, f"{self.prefix}B"), getattr(self, f"{self.prefix}R"), getattr(self, f"{self.prefix}A")

    def initial_factors(
        self, adapter_name: str, config: Any, module_name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config: Any, module_name: str) -> None:
        b_dict, r_dict, a_dict = self.factor_dicts()
        alpha = config.r if config.lora_alpha is None else config.lora_alpha
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = alpha / config.r
        b, r_mat, a = self.initial_factors(adapter_name, config, module_name)
        b_dict[adapter_name] = b.contiguous()
        a_dict[adapter_name] = a.contiguous()
        r_dict[adapter_name] = nn.Parameter(r_mat.contiguous())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def lowrank_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        b_dict, r_dict, a_dict = self.factor_dicts()
        return self.scaling[adapter] * (b_dict[adapter] @ r_dict[adapter]), a_dict[adapter]

    @torch.no_grad()
    def absorb_lowrank(self, adapter: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """Frozen ``B = left``, ``A = right`` and ``R = I / s``: ``ΔW = s·B R A = left @ right``; R then trains in
        the residual's own basis (LoRA-XS's SVD of W0 becomes the SVD of the quantization residual)."""
        b_dict, r_dict, a_dict = self.factor_dicts()
        b_dict[adapter].copy_(left)
        a_dict[adapter].copy_(right)
        r_dict[adapter].copy_(torch.eye(left.shape[1], dtype=r_dict[adapter].dtype) / self.scaling[adapter])

    def adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        b_dict, r_dict, a_dict = self.factor_dicts()
        h = nn.functional.linear(self.input_linear(x, a_dict[adapter]), r_dict[adapter])
        return nn.functional.linear(h, b_dict[adapter]) * self.scaling[adapter]


class LoraXSLayer(SandwichLayer):
    """LoRA-XS layer: ``B = U_r``, ``A = Σ_r V_rᵀ`` from the truncated SVD of the base weight."""

    prefix = "loraxs_"
    adapter_layer_names = ("loraxs_R",)
    other_param_names = ("loraxs_A", "loraxs_B", "r", "scaling")

    def initial_factors(
        self, adapter_name: str, config: LoraXSConfig, module_name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = config.r
        weight = base_weight_out_in(self)
        if weight.device.type == "meta":  # low_cpu_mem_usage loading: values come from the checkpoint
            b, a = torch.empty(self.out_features, r, device="meta"), torch.empty(r, self.in_features, device="meta")
        elif config.init_weights == "random":
            b, a = torch.empty(self.out_features, r), torch.empty(r, self.in_features)
            nn.init.kaiming_uniform_(b, a=5**0.5)
            nn.init.kaiming_uniform_(a, a=5**0.5)
        else:  # True, "svd" and False
            u, s, vh = truncated_svd(weight, r, config.svd_niter)
            b, a = u, s[:, None] * vh
        std = 0.1 if config.init_weights is False else config.r_init_std
        r_mat = torch.randn(r, r, device=b.device) * std
        return b.float(), r_mat, a.float()


class LoraXSModel(LowRankModel):
    """peft tuner that wraps target modules with :class:`LoraXSLayer`."""

    prefix = "loraxs_"
    tuner_layer_cls = LoraXSLayer


register_tuner(LeanTuneType.LORA_XS, LoraXSConfig, LoraXSModel)
