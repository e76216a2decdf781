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
* DDP: the accumulate-grad hooks fire before DDP averages the gradients, so under more than one process they are
  not used. :meth:`LayerwiseMixin.attach_ddp` registers a DDP communication hook instead: each gradient bucket is
  averaged (as DDP's default hook does: divide by the world size, all-reduce) and, once the average has arrived,
  every parameter of that bucket is stepped on it — during backward, on every rank with the same numbers, so
  projector refreshes agree across ranks. Accumulate with ``ddp_model.no_sync()`` for the micro-steps
  (``accumulation_steps`` must stay 1). DDP still copies the averaged buckets into ``.grad`` at the end of
  backward: call ``zero_grad()`` every step, as usual; the memory saving of per-layer updates is DDP's bucket size,
  not one layer. ``step()`` without ``attach_ddp`` raises (the updates would silently not happen).
* FSDP / DeepSpeed, and DDP inside ``Trainer``: refused.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


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
        self._ddp: Any = None
        self._distributed = False
        if not self.layerwise:
            return
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._group_index[p] = gi
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            if self.accumulation_steps != 1:
                raise ValueError("layer-wise updates under DDP: accumulate with `with ddp_model.no_sync():` for the "
                                 f"micro-steps and keep accumulation_steps=1 (got {self.accumulation_steps})")
            self._distributed = True  # stepped by attach_ddp's communication hook, on averaged gradients
            return
        for p in self._group_index:
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    def attach_ddp(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Drive the per-layer updates from ``ddp_model``'s gradient all-reduce (module docstring): call once, after
        wrapping the model this optimizer was built on in ``DistributedDataParallel``."""
        if not self.layerwise:
            raise ValueError("attach_ddp is for layerwise=True optimizers; a plain optimizer steps in step()")
        if not self._distributed:
            raise RuntimeError("attach_ddp needs torch.distributed initialized with more than one process")
        if self._ddp is not None:
            raise RuntimeError("this optimizer is already attached to a DistributedDataParallel model")
        mine = set(self._group_index)
        theirs = set(ddp_model.parameters())  # INT8 weights (qgalore.py) do not require grad but are in it
        if mine - theirs:
            raise ValueError(f"{len(mine - theirs)} parameters of this optimizer are not in the DDP model; build the "
                             "optimizer on the module you wrapped")
        ddp_model.register_comm_hook(state=None, hook=self._ddp_hook)
        self._ddp = ddp_model

    def _ddp_hook(self, state, bucket):  # no annotations: DDP compares them with its own types
        """Average the bucket (DDP's default), then step its parameters on the average."""
        buffer = bucket.buffer()
        buffer.div_(torch.distributed.get_world_size())
        future = torch.distributed.all_reduce(buffer, async_op=True).get_future()

        def step_bucket(done):
            reduced = done.value()[0]
            offset = 0
            with torch.no_grad():
                for p in bucket.parameters():  # the bucket holds its parameters' gradients back to back
                    grad = reduced[offset: offset + p.numel()].view_as(p)
                    offset += p.numel()
                    if p in self._group_index:
                        p.grad = grad
                        self._step_param(p, self.param_groups[self._group_index[p]])
                        p.grad = None
            return reduced

        return future.then(step_bucket)

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient the update of ``p`` reads (``p.grad``; INT8 weights keep theirs elsewhere, ``qgalore.py``)."""
        return p.grad

    def release_grad(self, p: torch.Tensor) -> None:
        """Free the gradient of ``p`` once it has been stepped on."""
        p.grad = None

    def _layerwise_hook(self, p: torch.Tensor) -> None:
        if self.grad_of(p) is None:
            return
        count = self._micro_counts.get(p, 0) + 1
        if count < self.accumulation_steps:
            self._micro_counts[p] = count
            return
        self._micro_counts[p] = 0
        with torch.no_grad():
            self._step_param(p, self.param_groups[self._group_index[p]])
        self.release_grad(p)

    def _flush_layerwise(self) -> None:
        """Step every parameter holding a partial accumulation window (called by ``optimizer.step()``)."""
        if self._distributed and self._ddp is None:
            raise RuntimeError("layer-wise updates under DDP need optimizer.attach_ddp(ddp_model) before training; "
                               "without it no parameter would be updated")
        with torch.no_grad():
            for p, count in list(self._micro_counts.items()):
                if count > 0 and self.grad_of(p) is not None:
                    self._step_param(p, self.param_groups[self._group_index[p]])
                    self.release_grad(p)
                self._micro_counts[p] = 0

    def remove_hooks(self) -> None:
        """Detach the per-parameter hooks (e.g. before handing the model to another optimizer)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
