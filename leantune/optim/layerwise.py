"""Per-layer ("layerwise") updates: each parameter is stepped inside backward and its gradient freed at once.

A ``register_post_accumulate_grad_hook`` (torch >= 2.1) fires after a parameter's ``.grad`` has been accumulated.
Every ``accumulation_steps``-th time it fires for a parameter, the hook applies that parameter's update and sets
``p.grad = None``, so only about one layer's gradient is alive at a time (GaLore paper Sec. 4.3).

Semantics (the pitfalls listed in GaLore #78, transformers #30371, APOLLO #14):
* gradient accumulation: the hook counts micro-batches per parameter and steps only at the boundary; earlier
  micro-batches accumulate into ``.grad`` as usual (so accumulation gives up the memory saving between boundaries,
  never correctness).  ``optimizer.step()`` flushes any parameter with a partial window (e.g. the last batch of an
  epoch) and is otherwise a no-op.
* the learning rate is read from ``param_groups`` when the hook fires, so an LR scheduler that steps once per
  ``optimizer.step()`` is used exactly as in the non-layerwise path; there is no x2 scheduler hack.
* global gradient-norm clipping is impossible (there is never a moment when all gradients exist).  Use
  ``max_grad_norm_per_param`` (clips each parameter's gradient on its own, in both paths).
* DDP / FSDP / DeepSpeed: refused, because DDP all-reduces buckets after the accumulate-grad hooks, so the hook
  would see un-synchronized local gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def assert_single_process(what: str = "Layer-wise optimizer updates") -> None:
    """Raise a clear error under torch.distributed with more than one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                f"{what} do not support DDP/FSDP/DeepSpeed (world_size={torch.distributed.get_world_size()}): "
                "the per-parameter hook would step with un-synchronized local gradients. "
                "Use layerwise=False for distributed training."
            )


class LayerwiseMixin:
    """Adds hook-driven per-parameter stepping to an optimizer that implements ``_step_param(p, group)``."""

    param_groups: list[dict[str, Any]]
    _step_param: Callable[[torch.Tensor, dict[str, Any]], None]

    def _init_layerwise(self, layerwise: bool, accumulation_steps: int) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.layerwise = bool(layerwise)
        self.accumulation_steps = int(accumulation_steps)
        self._micro_counts: dict[torch.Tensor, int] = {}
        self._group_index: dict[torch.Tensor, int] = {}
        self._hook_handles: list[Any] = []
        if not self.layerwise:
            return
        assert_single_process()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                self._group_index[p] = gi
                self._hook_handles.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    def _layerwise_hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        count = self._micro_counts.get(p, 0) + 1
        if count < self.accumulation_steps:
            self._micro_counts[p] = count
            return
        self._micro_counts[p] = 0
        with torch.no_grad():
            self._step_param(p, self.param_groups[self._group_index[p]])
        p.grad = None

    def _flush_layerwise(self) -> None:
        """Step every parameter holding a partial accumulation window (called by ``optimizer.step()``)."""
        with torch.no_grad():
            for p, count in list(self._micro_counts.items()):
                if count > 0 and p.grad is not None:
                    self._step_param(p, self.param_groups[self._group_index[p]])
                    p.grad = None
                self._micro_counts[p] = 0

    def remove_hooks(self) -> None:
        """Detach the per-parameter hooks (e.g. before handing the model to another optimizer)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
