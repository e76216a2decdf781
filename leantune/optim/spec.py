"""``OptimizerSpec`` and :data:`OPTIMIZERS`: one entry per optimizer name — its class, the defaults of its projected
group, what it can do, and how many bytes of state it keeps. The planner (``leantune plan``), the FSDP2 check
(``sharded.check_sharded_optimizer``), the support matrix and the documentation tables read this table; none of them
switches on optimizer names.

State bytes, per trainable tensor of n numbers in dtype size b, and per projected m × n matrix (k = min(m, n),
M = max(m, n), r = min(rank, k)); ``tests/optim/test_spec.py`` checks every entry against
``optimizer_state_bytes`` of the built optimizer after real steps:

    not projected            2·n·b  (8-bit optimizers, n ≥ 4096: 2·(n + 4⌈n/256⌉): codes + fp32 block scales)
    Adam moments (r × M)     2·r·M·b (8-bit when r·M ≥ 4096, as above)
    Adafactor                fp32: factored second moment (rows + columns: r + M projected, m + n for a matrix,
                             n for a vector), + the first moment (r·M, m·n, n) only with ``beta1``; fp32 basis r·k
    Conda moments            2·m·n·b (full size)
    projection               svd / rsvd: the r × k basis, r·k·b (svd2: both sides, r·(m + n)·b, moments 2·r²·b);
                             dct: 4·r (int32 column indices) + one shared d × d basis per size d = k;
                             random: nothing (regenerated from a seed); Conda: its k × k basis
    method's own             Fira: the previous residual norm (fp32 in the merged-GEMM variant, else b); Natural GaLore: s·r·M·b (s = history_size);
                             APOLLO: b (the limiter's norm); GradNormLoRP: 4·m·4 (fp32 magnitude, ‖V‖ and two moments)
    per optimizer            8-bit: 2·256·4 (the two shared quantization maps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from leantune.optim.apollo import APOLLOAdamW, APOLLOMini
from leantune.optim.base import MOMENT_POLICIES
from leantune.optim.conda import CondaAdamW
from leantune.optim.fira import ORTHONORMAL_KINDS, FiraAdamW
from leantune.optim.galore_adafactor import GaLoreAdafactor
from leantune.optim.galore_adamw import GaLoreAdamW
from leantune.optim.galore_adamw8bit import GaLoreAdamW8bit
from leantune.optim.gradnorm_lorp import GradNormLoRPAdamW, GradNormLoRPAdamW8bit
from leantune.optim.natural_galore import NaturalGaLoreAdamW
from leantune.optim.qgalore import QGaLoreAdamW, QGaLoreAdamW8bit
from leantune.optim.sharded import ROW_SHARDABLE_PROJECTORS, register_row_shardable

QMAP_BYTES = 2 * 256 * 4  # bitsandbytes' two dynamic quantization maps (fp32, 256 entries each)


def moment_bytes(n: int, b: int, eight_bit: bool) -> int:
    """Two Adam moments of ``n`` numbers: in the dtype, or 8-bit blockwise (256-blocks, fp32 scales) from 4096 on.

    >>> moment_bytes(1024 * 4096, 2, eight_bit=False)   # bf16: 2 bytes per number, two moments
    16777216
    >>> moment_bytes(1024 * 4096, 2, eight_bit=True)    # 1 byte per number + one fp32 scale per 256
    8519680
    >>> moment_bytes(100, 4, eight_bit=True)            # below 4096 numbers bitsandbytes keeps fp32
    800
    """
    return 2 * (n + 4 * math.ceil(n / 256)) if eight_bit and n >= 4096 else 2 * n * b


def _own_nothing(m: int, n: int, r: int, b: int, projector: str, options: dict[str, Any]) -> int:
    return 0


@dataclass(frozen=True)
class OptimizerSpec:
    """What a name in :data:`OPTIMIZERS` builds, what it supports, and its state bytes.

    ``rank`` None means the method has no rank (Conda rotates into a full basis) and a rank given is refused, as is
    another rank than a ``fixed_rank`` one (APOLLO-Mini is rank 1); ``adam`` says whether Adam's betas/eps (and
    TrainingArguments' adam_*) apply; ``moments``: "adam" (two r × M moments), "adafactor" or "full" (Conda);
    ``own_state(m, n, r, b, projector, options)``: bytes of the method's own extra state per projected matrix.
    """

    cls: type
    projector: str | None = "svd"
    scale: float = 0.25
    rank: int | None = 128
    fixed_rank: bool = False
    update_proj_gap: int = 200
    options: dict[str, Any] = field(default_factory=dict)
    adam: bool = True
    summary: str = ""
    moments: str = "adam"
    own_state: Callable[[int, int, int, int, str, dict[str, Any]], int] = _own_nothing
    #: the projector's bytes when they are not the plain basis r·k·b: ``projection(r, k, b, options)``
    projection: Callable[[int, int, int, dict[str, Any]], int] | None = None
    #: ``build_optimizer`` turns the targeted linears into INT8 (``optimizer_kwargs={"int8_weights": False}``: not)
    int8_weights: bool = False

    # ---- capabilities (read from the class, which enforces them, so the two cannot disagree) --------------------
    @property
    def eight_bit(self) -> bool:
        return bool(getattr(self.cls, "eight_bit", False))

    @property
    def row_shardable(self) -> bool:
        """Runs on FSDP2 row shards (``sharded.py``) with its default projector."""
        return bool(self.cls.row_shardable) and self.projector in ROW_SHARDABLE_PROJECTORS

    @property
    def fusable(self) -> bool:
        """Has the fused low-rank Adam step (``kernels.optimizer_step``) on CUDA."""
        return bool(getattr(self.cls, "fusable", False))

    @property
    def fp16(self) -> bool:
        """Accepts fp16 parameters (bf16 and fp32 are accepted by all)."""
        return bool(self.cls.supports_fp16)

    @property
    def moment_policies(self) -> tuple[str, ...]:
        """Moment policies at a projector refresh (``rotate`` needs Adam moments in the old basis)."""
        return MOMENT_POLICIES if self.cls.supports_rotate else tuple(p for p in MOMENT_POLICIES if p != "rotate")

    def rank_options(self, rank: int) -> dict[str, int]:
        """``{"rank": rank}`` if this optimizer takes a rank (not Conda, not the rank-1 APOLLO-Mini), else ``{}``."""
        return {} if self.rank is None or self.fixed_rank else {"rank": rank}

    # ---- state bytes ---------------------------------------------------------------------------------------------
    def state_bytes(self, shape: tuple[int, ...], rank: int | None, dtype: torch.dtype, projected: bool = True,
                    projector: str | None = None, options: dict[str, Any] | None = None) -> int:
        """Bytes this optimizer keeps for one trainable tensor of ``shape`` in ``dtype`` (module docstring), without
        the per-optimizer shared tensors (:meth:`shared_bytes`); ``options``: the optimizer's keyword options.

        >>> import torch
        >>> spec = OPTIMIZERS["galore_adamw"]
        >>> spec.state_bytes((4096, 11008), 1024, torch.bfloat16)  # moments 2·r·M·b + basis r·k·b
        53477376
        >>> 2 * 1024 * 11008 * 2 + 1024 * 4096 * 2
        53477376
        >>> spec.state_bytes((4096,), 1024, torch.bfloat16)        # a vector: plain Adam, 2·n·b
        16384
        """
        # INT8 weights are updated in fp32: their moments and projector are fp32 (optim/qgalore.py)
        b = 4 if dtype == torch.int8 else torch.empty((), dtype=dtype).element_size()
        options = {"scale": self.scale, **(options or {})}
        numel = math.prod(shape)
        first = self.moments == "adafactor" and options.get("beta1") is not None  # Adafactor's optional momentum
        if not projected or len(shape) != 2:
            if self.moments == "adafactor":  # fp32; factored (rows + columns) from 2-D on
                return 4 * (sum(shape[-2:]) if len(shape) >= 2 else numel) + (4 * numel if first else 0)
            return moment_bytes(numel, b, self.eight_bit)
        m, n = shape
        k, M = min(m, n), max(m, n)
        r = min(self.rank if self.fixed_rank else (rank or self.rank or 1), k)
        kind = projector or self.projector
        if self.moments == "full":
            return 2 * m * n * b + k * k * b
        if self.moments == "adafactor":
            moments, projection = 4 * (M + r) + (4 * r * M if first else 0), 4 * r * k
        elif kind == "svd2":
            moments, projection = moment_bytes(r * r, b, self.eight_bit), r * (m + n) * b
        else:
            moments = moment_bytes(r * M, b, self.eight_bit)
            projection = self.projection(r, k, b, options) if self.projection else \
                {"svd": r * k * b, "rsvd": r * k * b, "dct": 4 * r, "random": 0}[kind]
        return moments + projection + self.own_state(m, n, r, b, kind, options)

    def replicated_bytes(self, shape: tuple[int, ...], rank: int | None, dtype: torch.dtype,
                         projector: str | None = None, options: dict[str, Any] | None = None) -> int:
        """Of :meth:`state_bytes` for a projected matrix, what stays whole on every rank under FSDP2 (``sharded.py``):
        a right side's P (r × n) and a left side's r × n moments; with ``shard_replicated`` only a DCT projector's r
        indices. The rest follows W's rows (1/N of it per rank).

        >>> import torch
        >>> spec = OPTIMIZERS["galore_adamw"]
        >>> spec.replicated_bytes((11008, 4096), 1024, torch.bfloat16)  # right side: P, r·n·b
        8388608
        >>> spec.replicated_bytes((4096, 11008), 1024, torch.bfloat16)  # left side: moments, 2·r·n·b
        45088768
        >>> spec.replicated_bytes((4096, 11008), 1024, torch.bfloat16, options={"shard_replicated": True})
        0
        """
        if len(shape) != 2 or self.moments != "adam":
            return 0
        m, n = shape
        r = min(self.rank if self.fixed_rank else (rank or self.rank or 1), m, n)
        kind = projector or self.projector
        indices = 4 * r if kind == "dct" else 0
        if (options or {}).get("shard_replicated"):
            return indices
        b = 4 if dtype == torch.int8 else torch.empty((), dtype=dtype).element_size()
        if m >= n:  # right: P (r × n) or the DCT indices; the m × r moments are rows
            return {"svd": r * n * b, "rsvd": r * n * b}.get(kind, indices)
        return moment_bytes(r * n, b, self.eight_bit) + indices  # left: the r × n moments; P (m × r) is rows

    def shared_bytes(self, shapes: Iterable[tuple[int, ...]], dtype: torch.dtype, projector: str | None = None) -> int:
        """Tensors kept once per optimizer: 8-bit quantization maps, one DCT basis per projected size."""
        b = torch.empty((), dtype=dtype).element_size()
        sizes = {min(s) for s in shapes if len(s) == 2} if (projector or self.projector) == "dct" else set()
        return (QMAP_BYTES if self.eight_bit else 0) + sum(d * d * b for d in sizes)


def _fira(m, n, r, b, projector, options):
    """The previous residual norm: fp32 where Fira's merged-GEMM update applies (``FiraAdamW.add_update``: α > 0,
    |1 − α'| ≥ 1/2, a one-sided orthonormal basis), in the weights' dtype where S₀ is formed."""
    alpha = options["scale"]
    alpha_res = 1.0 if options.get("orthogonal_residual") and alpha != 0 else alpha
    merged = alpha > 0 and abs(1.0 - alpha_res) >= 0.5 and projector in ORTHONORMAL_KINDS
    return max(4, b) if merged else b


def _natural(m, n, r, b, projector, options):
    return options.get("history_size", 4) * r * max(m, n) * b


def _apollo(m, n, r, b, projector, options):
    return b


def _gradnorm(m, n, r, b, projector, options):
    return 4 * m * 4


def _qgalore_projection(r, k, b, options):
    """Q-GaLore's basis: packed INT4 (⌈r·k / B⌉·B / 2 bytes + an fp32 scale per block B) or, with ``proj_bits=None``,
    r·k·b; plus the fp32 leading vector (k) the lazy rule compares."""
    block = options.get("proj_block", 256)
    if options.get("proj_bits", 4) is None:
        return r * k * b + 4 * k
    blocks = math.ceil(r * k / block)
    return blocks * block // 2 + 4 * blocks + 4 * k


#: every optimizer name accepted by OptimizerConfig, the callback, ``leantune plan`` and optimizer_cls_and_kwargs
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "galore_adamw": OptimizerSpec(GaLoreAdamW, summary="GaLore: Adam in an SVD subspace"),
    "galore_adamw8bit": OptimizerSpec(GaLoreAdamW8bit, summary="GaLore with 8-bit blockwise moments"),
    "galore_adafactor": OptimizerSpec(GaLoreAdafactor, adam=False, moments="adafactor",
                                      summary="GaLore with factored Adafactor moments"),
    "fira_adamw": OptimizerSpec(FiraAdamW, own_state=_fira, summary="GaLore + norm-scaled full-rank residual"),
    "natural_galore_adamw": OptimizerSpec(NaturalGaLoreAdamW, own_state=_natural,
                                          summary="GaLore + Woodbury natural gradient"),
    "dct_adamw": OptimizerSpec(GaLoreAdamW, "dct", 1.0, summary="GaLore with a shared DCT basis (no SVD)"),
    "dct_fira_adamw": OptimizerSpec(FiraAdamW, "dct", 1.0, own_state=_fira, summary="Fira with a shared DCT basis"),
    "rsvd_galore_adamw": OptimizerSpec(GaLoreAdamW, "rsvd", summary="GaLore with a randomized SVD"),
    "apollo_adamw": OptimizerSpec(APOLLOAdamW, "random", 1.0, own_state=_apollo,
                                  summary="APOLLO: channel-wise scaled SGD (rank r)"),
    "apollo_mini": OptimizerSpec(APOLLOMini, "random", 128.0, rank=1, fixed_rank=True, own_state=_apollo,
                                 summary="APOLLO-Mini: tensor-wise (rank 1)"),
    "conda_adamw": OptimizerSpec(CondaAdamW, None, 1.0, rank=None, update_proj_gap=2000, moments="full",
                                 summary="Conda: column-normalized Adam (full-size state)"),
    "gradnorm_lorp": OptimizerSpec(GradNormLoRPAdamW, own_state=_gradnorm, summary="GradNormLoRP: weight-normalized GaLore"),
    "gradnorm_lorp8bit": OptimizerSpec(GradNormLoRPAdamW8bit, own_state=_gradnorm,
                                       summary="GradNormLoRP with 8-bit moments"),
    "q_galore_adamw": OptimizerSpec(QGaLoreAdamW, projection=_qgalore_projection, int8_weights=True,
                                    summary="Q-GaLore: INT8 weights (SR), INT4 lazy projectors, fp32 moments"),
    "q_galore_adamw8bit": OptimizerSpec(QGaLoreAdamW8bit, projection=_qgalore_projection, int8_weights=True,
                                        summary="Q-GaLore with 8-bit moments (the paper's optimizer)"),
}

register_row_shardable([name for name, spec in OPTIMIZERS.items() if spec.row_shardable])
