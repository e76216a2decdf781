"""How one decoder layer keeps what its backward needs — the modes the budget policy (:mod:`.budget`) picks from.

=================  ==================================================================  ==============================
mode               kept for backward                                                    recomputed in backward
=================  ==================================================================  ==============================
``keep``           everything autograd saves (with leantune's techniques, if on)        nothing
``save_matmuls``   the layer input, every matmul output and the attention kernel's      norms, RoPE, activations,
                   outputs (Korthikanti et al., arXiv 2205.05198 §4.1: keep what is     residual adds, casts
                   expensive to recompute; with flash attention there is no s² term)
``recompute_mlp``  the layer input, the attention block's matmul and attention          the MLP (whole), the norms
                   outputs                                                              and the attention's
                                                                                        elementwise ops
``save_attention`` the layer input and the attention kernel's outputs                    the layer except the
                                                                                        attention kernel
``checkpoint``     the layer input only                                                 the whole layer forward
``offload``        nothing on the device: the layer input goes to pinned host memory    the whole layer forward
                   on a side stream, and comes back ahead of the layer's backward
                   (CUDA only)
``division``       every saved tensor as DIVISION's low-frequency part + 2-bit         nothing (lossy: the saved
                   high-frequency part (:mod:`.division`, ≈ 4.5 bits an element)       tensors are approximations)
=================  ==================================================================  ==============================

The selective modes are torch's selective activation checkpointing (``create_selective_checkpoint_contexts``) with a
policy that caches the listed ops' outputs. A matmul's output is cached only when recomputing it costs more than it
weighs — its inner dimension is at least an eighth of its output's width: a LoRA-B product (inner dimension r) is
recomputed, the base projections and LoRA-A products are kept. All modes use
non-reentrant checkpointing with the RNG state restored, so the gradients are those of ``keep`` (bitwise in fp32 on
the CPU: the recomputation runs the same kernels on the same inputs).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers.cache_utils import Cache

from . import division
from .live import current_region, region

MODES = ("keep", "save_matmuls", "recompute_mlp", "save_attention", "checkpoint", "offload", "division")
#: modes whose gradients differ from keep's (never picked by a budget unless named in ``budget_modes``)
LOSSY_MODES = ("division",)

_aten = torch.ops.aten
#: matmul ops whose outputs the selective modes keep (``nn.Linear`` reaches the dispatcher as mm / addmm)
MATMUL_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
#: fused attention kernels (each keeps q, k, v, out and a log-sum-exp itself); the planner adds its meta stand-in
ATTENTION_OPS = {getattr(_aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name)}


def mlp_modules(layer: nn.Module) -> list[nn.Module]:
    """The modules forming ``layer``'s MLP (``mlp`` / ``feed_forward``; BERT: ``intermediate`` and ``output``), or []."""
    for name in ("mlp", "feed_forward", "ffn"):
        if isinstance(getattr(layer, name, None), nn.Module):
            return [getattr(layer, name)]
    if isinstance(getattr(layer, "intermediate", None), nn.Module) and isinstance(getattr(layer, "output", None),
                                                                                 nn.Module):
        return [layer.intermediate, layer.output]
    return []


def worth_saving(op: Any, shapes: tuple, region_name: str | None, mode: str) -> bool:
    """Whether ``mode`` caches the output of ``op`` (positional arguments of ``shapes``, in region ``region_name``)."""
    if op in ATTENTION_OPS:
        return mode in ("save_matmuls", "recompute_mlp", "save_attention")
    if op not in MATMUL_OPS or mode not in ("save_matmuls", "recompute_mlp"):
        return False
    if mode == "recompute_mlp" and region_name == "mlp":
        return False
    a, b = (shapes[1], shapes[2]) if op in (_aten.addmm.default, _aten.baddbmm.default) else (shapes[0], shapes[1])
    return 8 * a[-1] >= b[-1]  # inner dimension ≥ output width / 8


def _policy(mode: str) -> Callable:
    def policy(ctx, op, *args, **kwargs):
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        if worth_saving(op, shapes, current_region(), mode):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


_POLICIES = {mode: _policy(mode) for mode in ("save_matmuls", "recompute_mlp", "save_attention")}


def context_fn(mode: str) -> Callable | None:
    """torch's ``context_fn`` for ``checkpoint`` in ``mode`` (None: plain checkpointing)."""
    if mode in _POLICIES:
        return functools.partial(create_selective_checkpoint_contexts, _POLICIES[mode])
    return None


def tag_mlp(layer: nn.Module) -> list[Any]:
    """Hooks marking the ops of ``layer``'s MLP as region "mlp" (the selective policy reads it); their handles."""
    handles = []
    for module in mlp_modules(layer):
        state: list[Any] = []

        def enter(mod, args, state=state):
            context = region("mlp")
            context.__enter__()
            state.append(context)

        def leave(mod, args, output, state=state):
            if state:
                state.pop().__exit__(None, None, None)
            return output

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    return handles


class _Packed:
    """One offloaded tensor: its device, host buffer, the copy-out event and (once issued) the copy back."""

    def __init__(self, device: torch.device, host: torch.Tensor, event: Any) -> None:
        self.device, self.host, self.event = device, host, event
        self.back: torch.Tensor | None = None


class Offloader:
    """Saved-tensor hooks moving a checkpointed layer's input to host memory and back.

    On CUDA the copy to a pinned buffer runs on a side stream after the compute stream's work that produced it (the
    device tensor is handed to the caching allocator, which reuses it only after the copy: ``record_stream``), and
    the copy back of the layer input backward needs *next* is issued on the side stream while the current layer's
    backward runs (prefetch), the compute stream waiting on it only when it reads it. Host buffers are pooled by shape
    and dtype and reused across steps. On the CPU (tests, ``host_copies_on_cpu=True``) it copies synchronously;
    otherwise CPU tensors are left where they are (there is no device memory to free). ``packs`` / ``unpacks`` count
    the tensors that went out and came back.
    """

    def __init__(self, min_bytes: int = 0, host_copies_on_cpu: bool = False) -> None:
        self.min_bytes = min_bytes
        self.host_copies_on_cpu = host_copies_on_cpu
        self.packs = 0
        self.unpacks = 0
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._out: list[_Packed] = []  # packed, not yet back: backward needs them last first
        self._stream: Any = None

    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        free = self._pool.setdefault((tuple(t.shape), t.dtype), [])
        if free:
            return free.pop()
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")

    def pack(self, t: torch.Tensor) -> Any:
        if (t.device.type == "cpu" and not self.host_copies_on_cpu) or isinstance(t, nn.Parameter) or \
                t.numel() * t.element_size() < self.min_bytes:
            return t
        self.packs += 1
        if t.device.type == "meta":  # planning: the tensor leaves the device; only its shape comes back
            return _Packed(t.device, None, (tuple(t.shape), t.dtype))
        host = self._buffer(t)
        event = None
        if t.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(t.device)
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self._stream)
            event = self._stream.record_event()
        else:
            host.copy_(t)
        packed = _Packed(t.device, host, event)
        self._out.append(packed)
        return packed

    def _bring_back(self, packed: _Packed) -> None:
        if packed.back is not None:
            return
        if packed.host is None:  # meta (planning)
            shape, dtype = packed.event
            packed.back = torch.empty(shape, dtype=dtype, device="meta")
            return
        if packed.device.type == "cuda":
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(packed.event)
                packed.back = packed.host.to(packed.device, non_blocking=True)
        else:
            packed.back = packed.host.to(packed.device, copy=True)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        self._bring_back(packed)
        if packed in self._out:
            index = self._out.index(packed)
            self._out.pop(index)
            if index > 0:  # prefetch the input the next layer's backward reads
                self._bring_back(self._out[index - 1])
        out = packed.back
        if packed.device.type == "cuda":
            current = torch.cuda.current_stream(packed.device)
            current.wait_stream(self._stream)
            out.record_stream(current)
            if packed.event is not None:
                packed.event.synchronize()  # nothing is still copying out of the buffer we hand back to the pool
        self.unpacks += 1
        if packed.host is not None:
            self._pool[(tuple(packed.host.shape), packed.host.dtype)].append(packed.host)
        packed.back = None
        return out


def without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The layer's arguments with any KV cache (positional, as GPT-2 passes it, or keyword) replaced by None and
    ``use_cache`` off: a cache would grow again when the layer is recomputed (transformers' own checkpointing drops
    it the same way)."""
    args = tuple(None if isinstance(a, Cache) else a for a in args)
    kwargs = {k: None if isinstance(v, Cache) or k in ("layer_past", "past_key_values", "cache") else v
              for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def run_layer(forward: Callable, mode: str, args: tuple, kwargs: dict, offloader: Offloader | None = None) -> Any:
    """``forward(*args, **kwargs)`` in ``mode`` (the positional args — the hidden states — are what a checkpointed
    layer keeps; keyword tensors such as RoPE tables and masks are shared by all layers and kept anyway)."""
    if mode == "keep":
        return forward(*args, **kwargs)
    if mode == "division":
        with torch.autograd.graph.saved_tensors_hooks(division.pack, division.unpack):
            return forward(*args, **kwargs)
    args, kwargs = without_cache(args, kwargs)
    call = functools.partial(forward, **kwargs)
    options: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": True}
    fn = context_fn(mode)
    if fn is not None:
        options["context_fn"] = fn
    if mode == "offload":
        if offloader is None:
            raise ValueError("leantune: offload mode needs an Offloader")
        with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            return checkpoint(call, *args, **options)
    return checkpoint(call, *args, **options)
