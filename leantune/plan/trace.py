"""Saved-activation bytes of one training step, traced on the meta device (nothing is allocated).

The model (with its adapter, memory options and gradient checkpointing, as it will train) is built on ``meta`` and
run forward with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for backward is counted
once per storage (as ``leantune.memory.profile`` does on a real step), parameters and buffers excluded. Attention
through ``scaled_dot_product_attention`` is traced as the fused kernels a GPU (and torch's CPU flash kernel) run it:
they keep q, k, v, the output and one fp32 log-sum-exp per query row, never the s x s probabilities (the meta
device would otherwise take the math path, which keeps them).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import transformers
import transformers.masking_utils as masking
from torch import nn
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

from leantune.patching.live import held_for_backward
from leantune.patching.recompute import ATTENTION_OPS


@torch.library.custom_op("leantune::fused_attention_shapes", mutates_args=())
def _fused_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a flash / memory-efficient SDPA kernel returns: out and a (…, s) fp32 log-sum-exp (values unset: the
    trace only needs shapes). One op, so selective checkpointing caches it as it caches the real kernels."""
    return _outputs(q, v)


def _outputs(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # flash kernels (CUDA's and torch's CPU one) write out as (b, s, heads, d) and return its (b, heads, s, d)
    # transpose, so the caller's transpose(1, 2).reshape(b, s, h) is a view — no copy for o_proj to save
    b, heads, s, _ = q.shape
    out = q.new_empty((b, s, heads, v.shape[-1])).transpose(1, 2)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@_fused_attention_shapes.register_fake
def _(q, k, v):
    return _outputs(q, v)


def _setup(ctx, inputs, output):
    q, k, v = inputs
    ctx.save_for_backward(q, k, v, *output)  # what the kernels keep: q, k, v, out, lse


def _backward(ctx, grad_out, grad_lse):  # pragma: no cover - the trace never runs backward
    q, k, v, _, _ = ctx.saved_tensors
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


_fused_attention_shapes.register_autograd(_backward, setup_context=_setup)
ATTENTION_OPS.add(torch.ops.leantune.fused_attention_shapes.default)
# the activation budget's cost model prices ops by their FLOPs: the stand-in costs what the kernels cost
register_flop_formula(torch.ops.leantune.fused_attention_shapes)(
    lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))


@contextlib.contextmanager
def fused_attention(device: str = "cuda") -> Iterator[None]:
    """SDPA traced as the fused kernels of ``device`` run it; transformers' packed-sequence detection (which reads
    values, not possible on meta) answers "not packed". CUDA's flash kernel handles attention dropout (it keeps only
    the RNG state); torch's CPU flash kernel does not, so with ``dropout_p > 0`` on "cpu" the math path (which keeps
    the probabilities and the dropout mask) is traced as it is."""
    original = torch.nn.functional.scaled_dot_product_attention
    original_packed = getattr(masking, "find_packed_sequence_indices", None)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if device == "cpu" and dropout_p > 0:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return torch.ops.leantune.fused_attention_shapes(query, key, value)[0]

    torch.nn.functional.scaled_dot_product_attention = sdpa
    if original_packed is not None:
        masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        if original_packed is not None:
            masking.find_packed_sequence_indices = original_packed


def live_bytes(model: nn.Module, batch: dict[str, torch.Tensor], emulate_fused_attention: bool = True,
               device: str = "cuda") -> int:
    """Bytes one forward of ``model`` on ``batch`` leaves alive for backward, however they are held (saved tensors,
    checkpoint frames, selective-checkpoint caches: :class:`leantune.patching.live.LiveStorages`), the loss
    excluded; attention as ``device``'s fused kernels run it. What the activation budget is planned with."""
    attention = fused_attention(device) if emulate_fused_attention else contextlib.nullcontext()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with attention, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return held_for_backward(model, batch)
    finally:
        transformers.logging.set_verbosity(verbosity)


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor], emulate_fused_attention: bool = True,
                device: str = "cuda") -> int:
    """Bytes autograd saves for backward in one forward of ``model`` on ``batch`` (any device; meta for planning),
    attention as ``device``'s fused kernels run it."""
    excluded = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}
    keep: list[Any] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in excluded and key not in seen:
            seen[key] = storage.nbytes()
            keep.append(storage)  # the key stays unique while we count
        return t

    def checkpoint_inputs(module, args, kwargs):  # gradient checkpointing keeps each layer's inputs
        if module.__dict__.get("gradient_checkpointing", False) is True and module.training:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    pack(a)

    hooks = [m.register_forward_pre_hook(checkpoint_inputs, with_kwargs=True) for m in model.modules()]
    attention = fused_attention(device) if emulate_fused_attention else contextlib.nullcontext()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "use_cache=True is incompatible with checkpointing", once per trace
    try:
        # what this run saves is the answer; warnings about it (e.g. leantune.memory's sharing notes) are not
        with attention, warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            warnings.simplefilter("ignore")
            model(**batch)
    finally:
        transformers.logging.set_verbosity(verbosity)
        for h in hooks:
            h.remove()
    return sum(seen.values())
