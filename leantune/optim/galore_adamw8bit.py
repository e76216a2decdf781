"""GaLoreAdamW8bit: GaLore with 8-bit blockwise Adam moments (bitsandbytes) on the low-rank state.

Same algorithm as ``GaLoreAdamW`` (torch-style Adam), but M and V are stored as uint8 codes of bitsandbytes'
dynamic quantization maps with one fp32 absmax per block of 256 values (Dettmers et al. 2022).  Tensors with
fewer than ``min_8bit_size`` (4096) elements keep fp32 moments, like bitsandbytes.

The update for a projected parameter is computed into a transient low-rank buffer (r x max(m, n)) by
``bitsandbytes.functional.optimizer_update_8bit_blockwise`` with lr = 1 and no decay, so buffer = -N; then
W <- W (1 - eta wd) - eta alpha back(N).  Unlike galore-torch's 8-bit class, the full weight is never cloned.
Non-projected parameters are updated by bitsandbytes directly (its Adam applies the same decoupled decay).
bitsandbytes >= 0.49 runs these kernels on CPU as well as CUDA.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from leantune.optim.base import LowRankOptimizer
from leantune.optim.galore_adamw import GaLoreAdamW

BLOCKSIZE = 256


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError as err:  # pragma: no cover - bnb is a dependency
        raise ImportError("GaLoreAdamW8bit needs bitsandbytes (pip install bitsandbytes>=0.49).") from err
    return F


class GaLoreAdamW8bit(GaLoreAdamW):
    """8-bit blockwise Adam states in the GaLore subspace.  ``reference_adam`` is not available (bitsandbytes
    implements torch-style Adam); eps defaults to 1e-8, weight_decay to 0.0."""

    state_keys = LowRankOptimizer.state_keys + ("state1", "state2", "absmax1", "absmax2")
    eight_bit = True  # moments of >= 4096 numbers are 8-bit blocks (spec.py's state bytes read this)

    moment_keys = ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2")
    supports_rotate = False
    fusable = False  # the fused kernel keeps fp32 moments

    replicated_shardable = False
    replicated_refusal = "8-bit blocks over divided columns of R are not implemented"

    def __init__(self, params: Iterable[Any], *args: Any, min_8bit_size: int = 4096, **kwargs: Any) -> None:
        if kwargs.get("reference_adam"):
            raise ValueError("GaLoreAdamW8bit uses bitsandbytes' torch-style Adam; reference_adam=True is not supported.")
        F = _bnb()
        self._qmap1 = F.create_dynamic_map(signed=True)
        self._qmap2 = F.create_dynamic_map(signed=False)
        extra = {**(kwargs.pop("_extra_defaults", None) or {}), "min_8bit_size": min_8bit_size}
        super().__init__(params, *args, _extra_defaults=extra, **kwargs)

    def _qmaps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._qmap1.device != device:
            self._qmap1, self._qmap2 = self._qmap1.to(device), self._qmap2.to(device)
        return self._qmap1, self._qmap2

    def _init_8bit(self, like: torch.Tensor, state: dict[str, Any]) -> None:
        blocks = (like.numel() + BLOCKSIZE - 1) // BLOCKSIZE
        state["state1"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
        state["state2"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
        # absmax 0 dequantizes every code to 0, so these are zero moments
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)

    def _bnb_adam(self, g: torch.Tensor, target: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                  lr: float, weight_decay: float) -> None:
        beta1, beta2 = group["betas"]
        q1, q2 = self._qmaps(g.device)
        _bnb().optimizer_update_8bit_blockwise(
            "adam", g.contiguous(), target, state["state1"], state["state2"], beta1, beta2, 0.0, 0.0,
            group["eps"], state["step"], lr, q1, q2, state["absmax1"], state["absmax2"], weight_decay=weight_decay,
        )

    def direction(self, R: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                  shard: Any = None) -> tuple[torch.Tensor, float]:
        """Adam on R with 8-bit blockwise moments (bitsandbytes, lr 1 and no decay into a buffer: the buffer is −N);
        tensors below ``min_8bit_size`` keep fp32 moments, as bitsandbytes does."""
        rows = shard is not None and state.get("proj_right", True)  # R holds rows of W: plain or right side
        # FSDP2: decide by the whole R, the same on every rank and for any number of ranks
        numel = shard.full_shape[0] * math.prod(R.shape[1:]) if rows else R.numel()
        if numel < group["min_8bit_size"]:
            return super().direction(R, state, group)
        if "state1" not in state:
            self._init_8bit(R, state)
        buf = torch.zeros(R.shape, dtype=torch.float32, device=R.device)
        self._bnb_adam(R.float(), buf, state, group, 1.0, 0.0)
        return buf.neg_().to(R.dtype), group["lr"]
