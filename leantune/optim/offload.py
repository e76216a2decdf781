"""Optimizer state off the accelerator, brought in one parameter at a time (``OptimizerConfig(offload="cpu")``).

Between its updates a parameter's optimizer state (moments, 8-bit codes and scales, projector) lives in host memory
(pinned on CUDA). Its update brings it to the parameter's device, steps there exactly as without offload, and writes
it back; so the device holds the state of about two parameters at a time — the one stepping and the next one,
prefetched. With per-layer updates (``layerwise=True``) the updates run inside backward, in the order their
gradients are ready: the order seen at one step is the prefetch order of the next.

On CUDA the copies run on a side stream: the next parameter's state is copied host → device while the current one
steps, and a stepped parameter's state is copied device → host after an event on the compute stream, so neither
waits on the other unless a copy is late (ZeRO-Offload, arXiv 2101.06840, keeps the state on the host too, but steps
it there; "Deep Optimizer States", arXiv 2410.21316, moves part of it to the GPU per step).

Where the step itself is cheaper on the host, it runs there (``step_on="auto"``, the default; :func:`host_is_cheaper`):
the gradient and the weight go to the host, the update runs there on the host state in place, and the weight comes
back. :func:`host_is_cheaper` counts the bytes each side moves over the bus and through the host's memory: fp32 Adam
moments of a bf16 weight step on the host (ZeRO-Offload's case), while moments in the weight's dtype, 8-bit moments
and low-rank states step on the device, i.e. nearly every parameter of leantune's optimizers (spec §3.4).
``"device"`` and ``"host"`` force one side.

Everything that reads the state keeps working because ``optimizer.state`` always holds the host copies between
updates: ``state_dict`` (after the pending copies are waited for), ``load_state_dict`` (the loaded state is moved
back to the host), LR schedulers (the learning rate is read when the update runs), per-parameter clipping, gradient
accumulation, DDP and ``resume_from_checkpoint``. A device step computes as without offload, so weights and state
are bitwise equal; a host step runs the same update with the host's kernels, which on a GPU machine round otherwise
than the GPU's (to fp32 rounding; DDP ranks still agree: they all step the same parameters on the same side). On the
CPU, where the tests run with separate "device" copies, every setting is bitwise equal to no offload.

:meth:`StateOffload.ledger` says what each side holds: bytes on the host, bytes on the device now, and the device's
peak since the last reset.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

OFFLOAD_TARGETS = ("cpu",)
#: where an offloaded parameter's update runs: on its device (the state comes in), on the host (the gradient and the
#: weight go out), or "auto": the side that moves fewer bytes (:func:`host_is_cheaper`)
STEP_PLACES = ("auto", "device", "host")


def host_is_cheaper(state_bytes: int, param_bytes: int, grad_bytes: int, bandwidth_ratio: float = 3.0) -> bool:
    """Whether a parameter's update takes less time on the host than on the device, counting bytes moved.

    Device step: the state comes in and goes back over the bus, 2·S bytes (the compute there is free by comparison).
    Host step: the gradient goes out and the weight out and back, G + 2·W bytes over the bus, and the host's update
    streams the state in and out plus G and W through its memory, (2·S + G + 2·W) bytes at ``bandwidth_ratio``
    times the bus's rate (host memory ≈ 75 GB/s over PCIe 4.0 ≈ 25 GB/s: 3). So the host wins when
    (G + 2W)(k + 1) < 2S(k − 1), with k = ``bandwidth_ratio``; at k = 3 when S > G + 2W.

    By that rule fp32 Adam moments of a bf16 weight (S = 8 bytes a number against 6) step on the host, as in
    ZeRO-Offload (arXiv 2101.06840). Moments in the weight's dtype (S = 2 numbers against 3), 8-bit moments and any
    projected parameter's low-rank state step on the device: for leantune's optimizers that is nearly every
    parameter. ``bandwidth_ratio=inf`` counts the bus alone (2·S > G + 2·W)."""
    k = float(bandwidth_ratio)
    if k == float("inf"):
        return 2 * state_bytes > grad_bytes + 2 * param_bytes
    return (grad_bytes + 2 * param_bytes) * (k + 1) < 2 * state_bytes * (k - 1)


def _tensor_bytes(state: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


class StateOffload:
    """The host side of an optimizer's state (module docstring).

    Args:
        optimizer: the optimizer whose ``state`` is kept on the host.
        host: where the state lives between updates ("cpu").
        device: where updates run; None: each parameter's own device. Tests pass "cpu" with a CPU model, so the
            copies (and the ledger) happen as on a GPU.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, host: str | torch.device = "cpu",
                 device: str | torch.device | None = None, step_on: str = "auto", bandwidth_ratio: float = 3.0) -> None:
        if step_on not in STEP_PLACES:
            raise ValueError(f"offload step_on={step_on!r}, expected one of {STEP_PLACES}")
        self.optimizer = optimizer
        self.host = torch.device(host)
        self.device = None if device is None else torch.device(device)
        self.step_on = step_on
        self.bandwidth_ratio = bandwidth_ratio  # host memory over bus bandwidth, for "auto" (host_is_cheaper)
        self.host_steps = 0  # updates that ran on the host (for tests and the ledger)
        self._order: list[torch.Tensor] = []  # the update order of the last step (prefetch order)
        self._seen: list[torch.Tensor] = []
        self._position: dict[int, int] = {}  # id(parameter) -> its place in _order (tensors compare by value)
        self._prefetched: dict[torch.Tensor, tuple[dict[str, torch.Tensor], Any]] = {}
        self._pending: dict[torch.Tensor, Any] = {}  # parameter -> event of its device → host copy
        self._stream = None
        self.device_bytes = 0
        self.peak_device_bytes = 0
        self.to_host_all()

    # ---- where things go ---------------------------------------------------------------------------------------
    def _device_of(self, p: torch.Tensor) -> torch.device:
        return self.device or p.device

    def _cuda(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _to_host(self, t: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        """``t`` copied into the host buffer ``into`` when it fits, else into a new (pinned on CUDA) one — with
        ``t``'s strides: a moment stored transposed must come back transposed, or the next step's GEMM reads it in
        the other layout, which on some CPUs (AMD EPYC with MKL) rounds differently from the run without offload."""
        if into is None or into.shape != t.shape or into.stride() != t.stride() or into.dtype != t.dtype or \
                into.device != self.host or (t.is_cuda and not into.is_pinned()):  # (state a host step created)
            into = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=self.host, pin_memory=t.is_cuda)
        into.copy_(t, non_blocking=t.is_cuda)
        return into

    def _copy_in(self, p: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        """Device copies of ``p``'s host state (on the side stream on CUDA), and the event that says they arrived."""
        device = self._device_of(p)
        self._wait_written(p)
        state = self.optimizer.state.get(p, {})
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not self._cuda(device):
            return {k: v.to(device, copy=True) for k, v in tensors.items()}, None
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            out = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
            event = torch.cuda.Event()
            event.record(stream)
        return out, event

    def _wait_written(self, p: torch.Tensor) -> None:
        event = self._pending.pop(p, None)
        if event is not None:
            event.synchronize()

    # ---- the update ----------------------------------------------------------------------------------------------
    def runs_on_host(self, p: torch.Tensor, grad: torch.Tensor | None = None) -> bool:
        """Where ``p``'s update runs (``step_on``; "auto": :func:`host_is_cheaper` with the state it holds, or before
        its first update the state it will create). INT8 weights (Q-GaLore) always step on the device:
        their update requantizes into the layer that owns the codes."""
        if self.step_on == "device" or not p.is_floating_point():
            return False
        if self.step_on == "host":
            return True
        state = _tensor_bytes(self.optimizer.state.get(p, {})) or self._expected_state_bytes(p)
        grad_bytes = p.numel() * (p.element_size() if grad is None else grad.element_size())
        return host_is_cheaper(state, p.numel() * p.element_size(), grad_bytes, self.bandwidth_ratio)

    def _expected_state_bytes(self, p: torch.Tensor) -> int:
        """The state ``p``'s first update creates, as the rule reads it before that update: the optimizer's
        ``state_bytes`` formula, the one ``leantune plan`` uses (``optim/spec.py``); from the first update on the
        real bytes are read."""
        from leantune.optim.spec import OPTIMIZERS  # local: spec imports the optimizers, which import this module

        opt = self.optimizer
        spec = next((sp for sp in OPTIMIZERS.values() if type(opt) is sp.cls), None)
        group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), {})
        if spec is None:  # another optimizer: Adam-like moments of p's size
            return 2 * p.numel() * p.element_size()
        return spec.state_bytes(tuple(p.shape), group.get("rank"), p.dtype, projected=opt.is_low_rank(group, p),
                                projector=group.get("projector"), options=group)

    @contextlib.contextmanager
    def on_host(self, p: torch.Tensor, grad: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """During the block: host copies of ``p`` and ``grad`` (same strides) to step with the host state in place;
        afterwards the stepped weight is copied back into ``p``. On the CPU (tests) the copies are separate tensors,
        so the bookkeeping runs as on a GPU and the arithmetic is the device's own."""
        self._wait_written(p)  # its state's last device → host copy (it stepped on the device before)
        fetched = self._prefetched.pop(p, None)
        if fetched is not None:  # prefetched as the next in order, but it steps here
            self._count(-_tensor_bytes(fetched[0]))
        weight, gradient = self._to_host(p.detach(), None), self._to_host(grad, None)
        if p.is_cuda:
            torch.cuda.current_stream(p.device).synchronize()  # the host reads them next
        try:
            yield weight, gradient
            p.detach().copy_(weight, non_blocking=p.is_cuda)  # pinned: the copy may run on while the host goes on
            self.host_steps += 1
        finally:
            self._seen.append(p)
            self._prefetch_after(p)

    @contextlib.contextmanager
    def on_device(self, p: torch.Tensor) -> Iterator[None]:
        """During the block, ``optimizer.state[p]`` holds device tensors; afterwards host ones again, the device
        copies on their way back, and the next parameter's state on its way in."""
        state = self.optimizer.state[p]
        prefetched = self._prefetched.pop(p, None)
        fetched, event = prefetched or self._copy_in(p)
        if event is not None:
            torch.cuda.current_stream(self._device_of(p)).wait_event(event)
        host = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        state.update(fetched)
        if prefetched is None:  # a prefetched copy was counted when it was started
            self._count(_tensor_bytes(fetched))
        try:
            yield
        finally:
            self._write_back(p, host, _tensor_bytes(fetched))
            self._seen.append(p)
            self._prefetch_after(p)

    def _write_back(self, p: torch.Tensor, host: dict[str, torch.Tensor], fetched_bytes: int) -> None:
        state = self.optimizer.state[p]
        device = self._device_of(p)
        on_device = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._count(_tensor_bytes(on_device) - fetched_bytes)  # state the update created (its first step)
        if self._cuda(device):
            stream = self._side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for k, v in on_device.items():
                    state[k] = self._to_host(v, host.get(k))
                    v.record_stream(stream)
                event = torch.cuda.Event()
                event.record(stream)
            self._pending[p] = event
        else:
            for k, v in on_device.items():
                state[k] = self._to_host(v, host.get(k))
        self._count(-_tensor_bytes(on_device))

    def _prefetch_after(self, p: torch.Tensor) -> None:
        """Start copying in the state of the parameter that followed ``p`` last step (if it has state yet)."""
        i = self._position.get(id(p), -1) + 1
        if 0 < i < len(self._order):
            nxt = self._order[i]
            if nxt not in self._prefetched and self.optimizer.state.get(nxt) and not self.runs_on_host(nxt):
                fetched = self._copy_in(nxt)
                self._prefetched[nxt] = fetched
                self._count(_tensor_bytes(fetched[0]))

    def _count(self, delta: int) -> None:
        self.device_bytes += delta
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def end_of_step(self) -> None:
        """Called by ``optimizer.step()``: this step's update order becomes the next one's prefetch order, and a
        prefetched state that was not used (its parameter had no gradient) is dropped, not kept stale."""
        if self._seen:
            self._order, self._seen = self._seen, []
            self._position = {id(p): i for i, p in enumerate(self._order)}
        for fetched, _ in self._prefetched.values():
            self._count(-_tensor_bytes(fetched))
        self._prefetched.clear()

    # ---- everything else ---------------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every device → host copy (before the host state is read: ``state_dict``)."""
        for p in list(self._pending):
            self._wait_written(p)

    def to_host_all(self) -> None:
        """Move every state tensor to the host (at construction and after ``load_state_dict``)."""
        self.synchronize()
        for fetched, _ in self._prefetched.values():
            self._count(-_tensor_bytes(fetched))
        self._prefetched.clear()
        for state in self.optimizer.state.values():
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and v.device != self.host:
                    state[k] = self._to_host(v, None)

    def ledger(self) -> dict[str, int]:
        """Bytes of optimizer state on the host, on the device now (prefetched included), and the device's peak."""
        host = sum(_tensor_bytes(s) for s in self.optimizer.state.values())
        return {"host_bytes": host, "device_bytes": self.device_bytes, "peak_device_bytes": self.peak_device_bytes}
