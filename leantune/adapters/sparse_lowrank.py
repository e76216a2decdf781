"""SLTrain and LOST: linear weights parameterized as low-rank + sparse, for memory-efficient (pre)training.

Both *replace* the targeted linear weight: the dense base weight is dropped when the layer is built (it is not
kept frozen underneath, unlike LoRA), and the layer computes y = x Wᵀ + b with

    W = s · B A + S

* **SLTrain** (Han et al., NeurIPS 2024, arXiv 2406.02214): A ∈ R^{r×in} Kaiming-uniform, B ∈ R^{out×r} zero,
  s = lora_alpha / r; S has a *random fixed support* Ω of ⌊δ·out·in⌋ entries (sorted positions of a random
  permutation of the row-major flattening, drawn from ``seed``) with values U(−1/√in, 1/√in). Trainable per layer:
  r·(in + out) + ⌊δ·in·out⌋ (+ bias).
* **LOST** (Li et al., arXiv 2508.02668; the method section and code were not available, see the notes in
  ``LostConfig``): from a standard random init W₀ (``nn.Linear``'s), its truncated SVD gives the low-rank part
  B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ (s = 1), and the residual E = W₀ − B A (the remaining singular values)
  fills a *channel-wise* sparse part: the ⌊ρ·in⌋ input channels (columns) of E with the largest norm, stored as a
  dense out × k block and k column indices (eq. "L + S with structured S"; ``sparse_channels="out"`` uses rows).
  So W = W₀ exactly at init up to the dropped channels of E. Trainable: r·(in + out) + out·⌊ρ·in⌋.

The support is a buffer of int32 indices (saved with the adapter; never re-drawn on load), so the sparse part costs
its values plus 4 bytes per index, not a dense mask. Forward and backward rebuild W as a transient (one dense
weight at a time, as the reference) and save only x and the factors: dB = s·g_W Aᵀ, dA = s·Bᵀ g_W, dS = g_W at Ω,
dx = g_y W with g_W = g_yᵀ x.

``merge_and_unload()`` writes W into a plain ``nn.Linear``; merging cannot be undone (the base weight is gone).
One adapter per model. Quantized (bitsandbytes) targets are refused: there is no frozen dense path to quantize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import set_additional_trainable_modules
from torch import nn

from leantune._utils import upcast
from leantune._validation import check_choice, check_int, check_number

from .low_rank import LowRankConfig
from .registration import LeanTuneType, register_tuner
from .tuner_base import LeanTuneTuner


class SparseLowRankFunction(torch.autograd.Function):
    """y = x (s·B A + S)ᵀ + b without keeping W. ``sparse_dim`` −1: S has ``values`` at the flat positions
    ``index``; 1: ``values`` (out × k) are whole columns ``index``; 0: ``values`` (k × in) are whole rows."""

    @staticmethod
    def dense(B, A, values, index, scale: float, sparse_dim: int) -> torch.Tensor:
        W = (B @ A) * scale
        if sparse_dim < 0:
            W.view(-1).index_add_(0, index.long(), values.to(W.dtype))
        else:
            W.index_add_(sparse_dim, index.long(), values.to(W.dtype))
        return W

    @staticmethod
    def forward(ctx, x, B, A, values, index, bias, scale: float, sparse_dim: int):
        W = SparseLowRankFunction.dense(B, A, values, index, scale, sparse_dim)
        ctx.save_for_backward(x, B, A, values, index)
        ctx.scale, ctx.sparse_dim, ctx.has_bias = scale, sparse_dim, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return nn.functional.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, B, A, values, index = ctx.saved_tensors
        W = SparseLowRankFunction.dense(B, A, values, index, ctx.scale, ctx.sparse_dim)
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = (gy @ W.to(gy.dtype)).view(*grad_y.shape[:-1], W.shape[1]) if ctx.needs_input_grad[0] else None
        gW = gy.t().to(B.dtype) @ x.reshape(-1, x.shape[-1]).to(B.dtype)  # out × in, transient
        grad_B = (gW @ A.t()) * ctx.scale if ctx.needs_input_grad[1] else None
        grad_A = (B.t() @ gW) * ctx.scale if ctx.needs_input_grad[2] else None
        grad_values = None
        if ctx.needs_input_grad[3]:
            idx = index.long()
            picked = gW.view(-1)[idx] if ctx.sparse_dim < 0 else gW.index_select(ctx.sparse_dim, idx)
            grad_values = picked.to(values.dtype)
        grad_bias = upcast(gy).sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[5] else None
        return grad_x, grad_B, grad_A, grad_values, None, grad_bias, None, None


@dataclass
class SLTrainConfig(LowRankConfig):
    """SLTrain (module docstring). The paper's pretraining settings: r = 128 (60M) … 512 (1B), sparsity 0.03,
    lora_alpha 32 / 16 / 8, on every attention and MLP linear, AdamW lr 3e-3.

    Args:
        r: rank of B A.
        lora_alpha: s = lora_alpha / r.
        sparsity: δ, the fraction of entries in the sparse support (0 < δ < 1).
        seed: draws the support and the initial values (the support is saved, so loading never depends on it).
        train_dense_modules: also train (and save) every non-replaced module with parameters (embeddings, norms,
            head): what pretraining from scratch needs. They go to ``modules_to_save``.
    """

    r: int = field(default=128, metadata={"help": "Rank of the low-rank part."})
    lora_alpha: float = field(default=32.0, metadata={"help": "s = lora_alpha / r."})
    sparsity: float = field(default=0.03, metadata={"help": "Fraction of entries in the sparse support."})
    seed: int = field(default=0, metadata={"help": "Seed of the support and the initial values."})
    train_dense_modules: bool = field(default=False, metadata={"help": "Also train embeddings, norms, head."})
    #: whether ``sparsity`` is this method's (LOST sizes its sparse part with ``channel_ratio``)
    uses_sparsity: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.SLTRAIN
        check_number(self, "lora_alpha", minimum=0, strict=True)
        if not self.uses_sparsity:
            if self.sparsity != 0.0:
                raise ValueError(f"{type(self).__name__}.sparsity is SLTrain's; this method's sparse part is set by "
                                 "channel_ratio.")
        elif not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool) or \
                not 0 < self.sparsity < 1:
            raise ValueError(f"{type(self).__name__}.sparsity must be a fraction in (0, 1) of the entries, got "
                             f"{self.sparsity!r}.")
        check_int(self, "seed", minimum=0)
        if not isinstance(self.train_dense_modules, bool):
            raise ValueError(f"{type(self).__name__}.train_dense_modules must be a bool.")


@dataclass
class LostConfig(SLTrainConfig):
    """LOST (module docstring). Implemented choices, each an option because the paper's method section could not be
    read here: the low-rank part is the balanced top-r SVD of nn.Linear's random init; the sparse part is the
    residual's ⌊channel_ratio·in⌋ strongest input channels (``sparse_channels="in"``, or output rows with "out");
    s = 1 (``lora_alpha`` = r).

    Args:
        channel_ratio: ρ, the fraction of channels in the sparse part.
        sparse_channels: "in" (columns of W) or "out" (rows).
    """

    lora_alpha: Optional[float] = field(default=None, metadata={"help": "s = lora_alpha / r; None: s = 1."})
    channel_ratio: float = field(default=0.05, metadata={"help": "Fraction of channels in the sparse part."})
    sparse_channels: str = field(default="in", metadata={"help": "'in' (columns) or 'out' (rows)."})
    sparsity: float = field(default=0.0, metadata={"help": "Unused by LOST (channel_ratio sets its sparse part)."})
    uses_sparsity: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = float(self.r)
        super().__post_init__()
        self.peft_type = LeanTuneType.LOST
        check_number(self, "channel_ratio", minimum=0, strict=True)
        if self.channel_ratio >= 1:
            raise ValueError(f"LostConfig.channel_ratio must be < 1, got {self.channel_ratio}.")
        check_choice(self, "sparse_channels", ("in", "out"))


def _support(out_features: int, in_features: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    nnz = int(math.floor(sparsity * out_features * in_features))
    if nnz < 1:
        raise ValueError(f"sparsity {sparsity} gives no sparse entry in a {out_features} x {in_features} weight")
    return torch.sort(torch.randperm(out_features * in_features, generator=generator)[:nnz]).values.to(torch.int32)


class SparseLowRankLayer(nn.Module, BaseTunerLayer):
    """The layer computing y = x (s·B A + S)ᵀ + b (module docstring) in place of its base linear; the bias (if
    any) moves into the layer so that it trains and is saved with the adapter."""

    prefix: ClassVar[str] = "sltrain_"
    label: ClassVar[str] = "SLTrain"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SLTrainConfig, module_name: str) -> None:
        nn.Module.__init__(self)
        if type(base_layer) is not nn.Linear:
            raise TypeError(f"{type(config).__name__} replaces plain nn.Linear weights; {module_name} is a "
                            f"{type(base_layer).__name__} (quantized or Conv1D layers: load the model unquantized / "
                            "target nn.Linear modules).")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for part in ("A", "B", "values", "bias"):
            setattr(self, f"{self.prefix}{part}", nn.ParameterDict({}))
        setattr(self, f"{self.prefix}index", BufferDict({}, persistent=True))
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.sparse_dim: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def part(self, name: str) -> nn.ParameterDict | BufferDict:
        return getattr(self, f"{self.prefix}{name}")

    def update_layer(self, adapter_name: str, config: SLTrainConfig, module_name: str) -> None:
        if self.r:
            raise ValueError(f"{type(config).__name__} replaces the weight of {module_name}; a model holds one such "
                             "adapter (merge_and_unload() first to add another).")
        out_f, in_f, r = self.out_features, self.in_features, config.r
        if r > min(out_f, in_f):
            raise ValueError(f"{type(config).__name__}.r={r} exceeds the smaller side of {module_name} ({out_f} x {in_f})")
        weight = self.base_layer.weight
        device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + sum(map(ord, module_name)))
        B, A, values, index, sparse_dim = self.initial_parts(config, gen)
        self.r[adapter_name], self.sparse_dim[adapter_name] = r, sparse_dim
        self.scaling[adapter_name] = config.lora_alpha / r
        # contiguous: LOST's A is a row-scaled slice of the SVD's column-major Vh, and FSDP2 shards contiguous only
        self.part("A")[adapter_name] = nn.Parameter(A.to(device, dtype).contiguous())
        self.part("B")[adapter_name] = nn.Parameter(B.to(device, dtype).contiguous())
        self.part("values")[adapter_name] = nn.Parameter(values.to(device, dtype).contiguous())
        self.part("index")[adapter_name] = index.to(device)
        if self.base_layer.bias is not None:
            self.part("bias")[adapter_name] = nn.Parameter(self.base_layer.bias.detach().clone())
            self.base_layer.bias = None
        # the dense weight is replaced, not kept underneath: free it (merge writes a new one)
        self.base_layer.weight = nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def initial_parts(self, config: SLTrainConfig, gen: torch.Generator):
        """SLTrain: A Kaiming-uniform, B = 0, a random support with values U(−1/√in, 1/√in)."""
        out_f, in_f, r = self.out_features, self.in_features, config.r
        A = torch.empty(r, in_f)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        B = torch.zeros(out_f, r)
        if config.init_weights is False:  # a non-zero product, for tests
            nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=gen)
        index = _support(out_f, in_f, config.sparsity, gen)
        bound = 1 / math.sqrt(in_f)
        return B, A, torch.empty(len(index)).uniform_(-bound, bound, generator=gen), index, -1

    # ---- compute --------------------------------------------------------------------------------------------
    def _parts(self, adapter: str):
        return (self.part("B")[adapter], self.part("A")[adapter], self.part("values")[adapter],
                self.part("index")[adapter])

    def _bias(self, adapter: str) -> Optional[torch.Tensor]:
        return self.part("bias")[adapter] if adapter in self.part("bias") else None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense W (the whole weight: there is no base weight to add it to)."""
        return SparseLowRankFunction.dense(*self._parts(adapter), self.scaling[adapter], self.sparse_dim[adapter])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            raise RuntimeError(f"{self.label} replaces the weight: there is no base layer to run with the adapter "
                               "disabled.")
        adapter = self.active_adapters[0]
        return SparseLowRankFunction.apply(x, *self._parts(adapter), self._bias(adapter), self.scaling[adapter],
                                           self.sparse_dim[adapter])

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if self.merged:
            return
        adapter = self.active_adapters[0]
        W = self.get_delta_weight(adapter).detach()
        if safe_merge and not torch.isfinite(W).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        self.base_layer.weight = nn.Parameter(W, requires_grad=False)
        bias = self._bias(adapter)
        if bias is not None:
            self.base_layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        raise RuntimeError(f"{self.label} merges cannot be undone (the layer replaced the dense weight); keep a copy "
                           "of the model or reload the adapter.")

    def sparse_bytes(self, adapter: str = "default") -> int:
        """Bytes of the sparse part as stored: values + int32 indices (no dense mask)."""
        v, i = self.part("values")[adapter], self.part("index")[adapter]
        return v.numel() * v.element_size() + i.numel() * i.element_size()

    def extra_repr(self) -> str:
        a = self.active_adapters[0] if self.r else None
        return f"{self.label}: in={self.in_features}, out={self.out_features}, r={self.r.get(a)}"


class SLTrainLayer(SparseLowRankLayer):
    prefix = "sltrain_"
    label = "SLTrain"
    adapter_layer_names = ("sltrain_A", "sltrain_B", "sltrain_values", "sltrain_bias")
    other_param_names = ("sltrain_index", "r", "scaling", "sparse_dim")


class LostLayer(SparseLowRankLayer):
    prefix = "lost_"
    label = "LOST"
    adapter_layer_names = ("lost_A", "lost_B", "lost_values", "lost_bias")
    other_param_names = ("lost_index", "r", "scaling", "sparse_dim")

    def initial_parts(self, config: LostConfig, gen: torch.Generator):
        """LOST (module docstring): balanced top-r SVD of nn.Linear's random init, and the strongest channels of
        the residual as the sparse part."""
        out_f, in_f, r = self.out_features, self.in_features, config.r
        W0 = torch.empty(out_f, in_f)
        nn.init.kaiming_uniform_(W0, a=math.sqrt(5), generator=gen)  # nn.Linear's init
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        root = S[:r].sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        E = W0 - B @ A  # the remaining singular values
        dim = 1 if config.sparse_channels == "in" else 0
        k = int(math.floor(config.channel_ratio * E.shape[dim]))
        if k < 1:
            raise ValueError(f"channel_ratio {config.channel_ratio} keeps no channel of a {out_f} x {in_f} weight")
        channels = torch.sort(torch.topk(E.norm(dim=1 - dim), k).indices).values
        values = E.index_select(dim, channels)
        return B * (r / config.lora_alpha), A, values.contiguous(), channels.to(torch.int32), dim


class SLTrainModel(LeanTuneTuner):
    """peft tuner replacing target linears with :class:`SLTrainLayer`."""

    prefix = "sltrain_"
    tuner_layer_cls = SLTrainLayer
    integer_keys = ("sltrain_index",)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.train_dense_modules:  # pretraining: everything else trains too (and is saved with the adapter)
            layers = [n for n, m in model.named_modules() if isinstance(m, SparseLowRankLayer)]
            dense = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))
                     and not any(n == t or n.startswith(t + ".") for t in layers)
                     and ".original_module" not in f"{n}." and ".modules_to_save." not in f"{n}."]  # peft's copies
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(dense))
            # peft made its modules_to_save trainable at the end of its own inject_adapter, before this list
            # existed: do it now (re-wrapping an already wrapped module only adds this adapter's copy)
            set_additional_trainable_modules(model=model, peft_config=config,
                                             model_config=BaseTuner.get_model_config(self), adapter_name=adapter_name,
                                             activate_adapter=adapter_name in self.active_adapters)


class LostModel(SLTrainModel):
    """peft tuner replacing target linears with :class:`LostLayer`."""

    prefix = "lost_"
    tuner_layer_cls = LostLayer
    integer_keys = ("lost_index",)


register_tuner(LeanTuneType.SLTRAIN, SLTrainConfig, SLTrainModel)
register_tuner(LeanTuneType.LOST, LostConfig, LostModel)
