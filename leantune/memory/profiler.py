"""Where training memory goes: bytes saved for backward per module kind, plus parameters, gradients, optimizer state.

``profile(model, batch)`` runs one training step with ``torch.autograd.graph.saved_tensors_hooks`` active during the
forward. Every tensor autograd saves is attributed to the innermost module running at that moment (tracked with
forward pre/post hooks), deduplicated by storage (a storage saved by a norm *and* the next linear counts once, for the
first saver), and parameters/buffers are excluded. With gradient checkpointing the checkpointed layers keep only their
inputs; those are counted as "checkpoint inputs".

Saved-tensor hooks do not see everything a step holds: a selective-checkpoint cache (the activation budget's
selective modes) is invisible to them. With a budget on, ``held_bytes`` counts every storage the forward leaves alive
(:class:`leantune.patching.live.LiveStorages`), and ``policy`` lists what the budget chose per layer.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from leantune._utils import output_loss, storage_bytes
from leantune.patching.live import LiveStorages
from leantune.patching.state import state_of

CATEGORIES = ("norm", "activation", "linear/adapter input", "attention", "mlp", "checkpoint inputs", "other")
_ACTIVATION_NAMES = ("GELU", "SiLU", "ReLU", "Tanh", "Activation", "ApproxActivation", "Sigmoid")


def categorize(module: nn.Module) -> str:
    """Module kind used to group saved bytes: norm, activation, linear/adapter input, attention, mlp or other."""
    name = type(module).__name__
    if isinstance(module, nn.Linear) or name in ("Conv1D", "Linear") or hasattr(module, "lora_A"):
        return "linear/adapter input"
    if "Norm" in name:
        return "norm"
    if any(key in name for key in _ACTIVATION_NAMES):
        return "activation"
    if "Attention" in name:
        return "attention"
    if any(key in name for key in ("MLP", "DenseActDense", "DenseGatedActDense", "Intermediate", "FeedForward")):
        return "mlp"
    return "other"


@dataclass
class SavedTensorRecord:
    module: str
    module_type: str
    category: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class MemoryProfile:
    """Result of :func:`profile`; ``str()`` gives a table. Byte counts are exact storage sizes."""

    saved_bytes: dict[str, int]
    saved_bytes_by_type: dict[str, int]
    records: list[SavedTensorRecord] = field(repr=False)
    parameter_bytes: int
    trainable_parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    loss: float
    step_time_s: float
    peak_device_bytes: int | None = None
    held_bytes: int | None = None
    policy: list[str] = field(default_factory=list)

    @property
    def total_saved_bytes(self) -> int:
        return sum(self.saved_bytes.values())

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Bar chart (MiB) of what one step keeps: saved activations by category, then parameters, gradients and
        optimizer state; returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 3.5))
        rows = [(f"saved: {c}", self.saved_bytes[c]) for c in CATEGORIES if self.saved_bytes.get(c)]
        rows += [("parameters", self.parameter_bytes), ("gradients", self.gradient_bytes),
                 ("optimizer state", self.optimizer_state_bytes)]
        names, values = zip(*rows[::-1])
        colors = ["tab:red" if n.startswith("saved") else "tab:blue" for n in names]
        ax.barh(names, [v / 2**20 for v in values], color=colors)
        ax.set_xlabel("MiB")
        ax.set_title(title or f"one training step: {self.total_saved_bytes / 2**20:.1f} MiB saved for backward")
        return ax

    def __str__(self) -> str:
        total = max(self.total_saved_bytes, 1)
        lines = ["| memory | MiB | share of saved |", "|---|---:|---:|"]
        for category in CATEGORIES:
            value = self.saved_bytes.get(category, 0)
            if value:
                lines.append(f"| saved: {category} | {value / 2**20:.2f} | {100 * value / total:.1f}% |")
        lines.append(f"| **saved for backward (total)** | **{self.total_saved_bytes / 2**20:.2f}** | 100% |")
        lines.append(f"| parameters (trainable) | {self.parameter_bytes / 2**20:.2f} "
                     f"({self.trainable_parameter_bytes / 2**20:.2f}) | |")
        lines.append(f"| gradients | {self.gradient_bytes / 2**20:.2f} | |")
        lines.append(f"| optimizer state | {self.optimizer_state_bytes / 2**20:.2f} | |")
        if self.held_bytes is not None:
            lines.append(f"| held for backward (live storages: + checkpoint / selective caches) | "
                         f"{self.held_bytes / 2**20:.2f} | |")
        if self.peak_device_bytes is not None:
            lines.append(f"| peak device memory | {self.peak_device_bytes / 2**20:.2f} | |")
        lines += [f"\nactivation budget: {line}" for line in self.policy]
        lines.append(f"\nloss {self.loss:.4f}, step time {self.step_time_s * 1000:.1f} ms; by module type: "
                     + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in
                                 sorted(self.saved_bytes_by_type.items(), key=lambda kv: -kv[1])[:8]))
        return "\n".join(lines)


def _default_loss(output: Any) -> torch.Tensor:
    """``output.loss``, else the mean square of the first output (what ``profile`` backpropagates)."""
    loss = output_loss(output)
    if loss is not None:
        return loss
    first = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", None)
    if first is None:
        first = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
    if not isinstance(first, torch.Tensor):
        raise ValueError("profile: cannot find a loss in the model output; pass loss_fn=")
    return first.float().pow(2).mean()


def profile(model: nn.Module, batch: dict | torch.Tensor | tuple, optimizer: torch.optim.Optimizer | None = None,
            loss_fn: Callable[[Any], torch.Tensor] | None = None, step: bool = True) -> MemoryProfile:
    """Run one training step (forward, backward, optimizer step) and account for its memory.

    Args:
        model: any ``nn.Module`` (HF / peft models are called as ``model(**batch)``).
        batch: a dict of keyword inputs, a tensor or a tuple of positional inputs.
        optimizer: optimizer whose state is counted; default ``AdamW(trainable, lr=0)``, which builds the state but
            leaves the parameters unchanged.
        loss_fn: maps the model output to a scalar loss; default: ``output.loss``, else mean square of the first
            output.
        step: run the optimizer step (needed to count optimizer state).
    """
    names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    stack: list[nn.Module] = []
    seen: dict[tuple, SavedTensorRecord] = {}
    keep_alive: list[Any] = []

    def record(t: torch.Tensor, module: nn.Module | None, category: str | None = None) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in excluded:
            return
        key = (t.device, ptr)
        if key in seen:
            return
        module_type = type(module).__name__ if module is not None else "<none>"
        seen[key] = SavedTensorRecord(names.get(id(module), "<top>"), module_type,
                                      category or (categorize(module) if module is not None else "other"),
                                      tuple(t.shape), t.dtype, storage.nbytes())
        keep_alive.append(storage)  # no data_ptr reuse while we count

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t, stack[-1] if stack else None)
        return t

    def pre_hook(module, args, kwargs):
        stack.append(module)
        if module.__dict__.get("gradient_checkpointing", False) is True and module.training:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    record(a, module, "checkpoint inputs")

    def post_hook(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()

    hooks = []
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(m.register_forward_hook(post_hook))
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = any(p.is_cuda for p in model.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # the live counter (a dispatch mode: a cost per op) runs where saved-tensor hooks miss something: a budget
    live = LiveStorages(next((p.device.type for p in model.parameters()), "cpu")) if _policy_report(model) is not None \
        else None
    try:
        with live or contextlib.nullcontext(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if isinstance(batch, dict):
                output = model(**batch)
            elif isinstance(batch, (tuple, list)):
                output = model(*batch)
            else:
                output = model(batch)
            loss = (loss_fn or _default_loss)(output)
        del output
        held = live.bytes(exclude=loss) if live is not None else None
    finally:
        if live is not None:
            live.release()
        for h in hooks:
            h.remove()
    records = list(seen.values())
    keep_alive.clear()
    loss.backward()
    gradient_bytes = storage_bytes(p.grad for p in trainable if p.grad is not None)
    optimizer_state_bytes = 0
    if step and trainable:
        optimizer = optimizer or torch.optim.AdamW(trainable, lr=0.0)
        optimizer.step()
        optimizer_state_bytes = storage_bytes(
            v for state in optimizer.state.values() for v in state.values())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    by_category: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for r in records:
        by_category[r.category] = by_category.get(r.category, 0) + r.nbytes
        by_type[r.module_type] = by_type.get(r.module_type, 0) + r.nbytes
    return MemoryProfile(
        saved_bytes=by_category, saved_bytes_by_type=by_type, records=records,
        parameter_bytes=storage_bytes(model.parameters()), trainable_parameter_bytes=storage_bytes(trainable),
        gradient_bytes=gradient_bytes, optimizer_state_bytes=optimizer_state_bytes, loss=float(loss.detach()),
        step_time_s=elapsed, peak_device_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        held_bytes=held, policy=_policy_report(model) or [],
    )


def _policy_report(model: nn.Module) -> list[str] | None:
    """The activation budget's decisions (None: the model has no budget)."""
    state = state_of(model)
    policy = getattr(state, "policy", None)
    return policy.report() if policy is not None else None
