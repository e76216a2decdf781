"""Small helpers every leantune package uses: one copy each."""

from __future__ import annotations

from typing import Any, Iterable

import torch

#: what peft puts in front of every base-model parameter name (``PeftModel.base_model.model.<name>``)
PEFT_PREFIX = "base_model.model."


class LeanTuneError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


class NonFiniteGradientWarning(RuntimeWarning):
    """A gradient held NaN/inf and its update was skipped (the weights never receive it)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: float64 for float64 inputs, float32 for everything else (16-bit included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`compute_dtype` (no copy when it already is)."""
    return t.to(compute_dtype(t.dtype))


def channel_norms(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None, exact: bool = False) -> torch.Tensor:
    """``torch.linalg.vector_norm(x, dim=dim, dtype=dtype)`` of a 2-D ``x``, rounded differently where it is faster.

    On CPU torch's norm reduces across the rows of a row-major matrix (``dim=0``, a column's norm) 3–10× slower
    than squaring and summing (torch 2.13: 3.9 vs 0.39 ms at 1024 × 1024, 3.2 vs 1.0 ms at 1024 × 2752); that case
    sums the squares in :func:`compute_dtype` (one temporary). ``exact=True`` (code that must match a reference
    bitwise) always takes torch's norm.
    """
    if not exact and dim == 0 and x.dim() == 2 and x.device.type == "cpu" and x.stride(1) == 1 and (
            dtype is None or torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits):  # (torch refuses narrowing)
        wide = compute_dtype(x.dtype)
        squares = x.square() if x.dtype == wide else x.to(wide).square_()
        return squares.sum(0).sqrt_().to(dtype or x.dtype)
    return torch.linalg.vector_norm(x, dim=dim, dtype=dtype)


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, its gradient or a state dict entry)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a DTensor (sharing its storage, so in-place updates reach the parameter); t itself
    otherwise."""
    return t.to_local() if is_sharded(t) else t


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Sum of distinct untyped-storage sizes of the tensors among ``tensors`` (a view costs its whole base storage,
    once; non-tensors and empty storages are skipped). This is what really stays in memory."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = local(t).untyped_storage()  # an FSDP2 DTensor: what this rank holds
        if storage.nbytes() == 0:
            continue
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def output_loss(output: Any) -> torch.Tensor | None:
    """The ``loss`` of a model output (a ``ModelOutput``, a dict or an object with ``.loss``), ``None`` if absent."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    return loss


def batch_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` with a clear error when the batch has no labels."""
    loss = output_loss(model(**batch))
    if loss is None:
        raise ValueError("The model returned no loss for a batch: include labels, or pass loss_fn=(model, batch) -> loss.")
    return loss


def scale_columns(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``weight · diag(γ)`` (columns scaled by ``γ``), formed in fp32 (fp64 for fp64 weights) with one rounding back to
    the weight's dtype; differentiable in ``weight``. How a folded norm's γ enters an adapter's input-side factor."""
    compute = compute_dtype(weight.dtype)
    return (weight.to(compute) * gamma.to(device=weight.device, dtype=compute)).to(weight.dtype)


_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2.0**10, "MIB": 2.0**20, "GIB": 2.0**30, "TIB": 2.0**40}


def parse_bytes(text: str) -> float | None:
    """Bytes of a size like "24GB" (1e9 units) or "512MiB" (2^20 units), case-insensitive; None if it is not one,
    or not positive.

    >>> parse_bytes("6GB"), parse_bytes("1GiB"), parse_bytes("25%")
    (6000000000.0, 1073741824.0, None)
    """
    upper = text.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):  # "GIB" before "B"-suffixed shorter units
        if upper.endswith(unit):
            try:
                value = float(upper[: -len(unit)])
            except ValueError:
                return None
            return value * _UNITS[unit] if value > 0 else None
    return None



def one_bnb_cpu_path(model: torch.nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on their one CPU numeric path, in training and in evaluation; return how many.

    bitsandbytes (0.50) ``Linear4bit.forward`` repacks the weight at the first CPU forward in eval mode without
    grad, *only on CPUs with AVX512-BF16*, and rounds each block's absmax to bf16 on the way (saving a checkpoint
    unpacks it again). So the same model computed another function in evaluation than in training, another on an
    AVX512-BF16 CPU than elsewhere, and a resumed run another than the uninterrupted one (it depends on when the
    first eval forward and the checkpoints fall). Switching the repack off costs CPU inference speed only.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
