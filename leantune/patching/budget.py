"""The activation budget: per decoder layer, the cheapest recomputation mode (:mod:`.recompute`) that fits.

``MemoryConfig(budget=0.25)`` keeps at most a quarter of what the decoder layers would keep without the policy
(with leantune's other techniques as configured); ``budget="6GB"`` (or a byte count) caps the decoder layers'
activations at that many bytes. The logits are the chunked loss's business (``chunked_loss=True``).

**Cost model.** On the first training forward of each input shape, layer 0 is run once per mode on a copy of its
real input (:func:`probe`): the bytes each mode leaves alive are *measured* (:class:`.live.LiveStorages`, which sees
checkpoint frames and selective-checkpoint caches), and the layer's ops are recorded with their FLOPs and bytes. A
mode's extra time is what its backward recomputes::

    t(op) = max(FLOPs / F, bytes moved / B) + o          (F, B, o: the device's rates and per-op host cost)
    extra(mode) = Σ_{op recomputed by mode} t(op)  [+ 2 · n_ops · o_sac for selective modes: their dispatch mode]
                  [+ max(0, input bytes / B_host − t_fwd) for offload: a copy that outlasts the forward shows]

and the layer's eager step is ``t_fwd · (1 + β)``, β = 2 with trainable base weights (dX and dW), 1.1 without (dX).

**Choice.** Layers are alike, so the modes' (bytes, extra time) points are reduced to their lower convex hull, and
layers move one at a time along it — first layers first (their activations live longest) — until the layers' bytes
fit: at every budget the cost is the hull's, the least total recomputation for those bytes (up to one layer's step).
A budget at or above ``keep`` changes nothing; one below the cheapest mode everywhere keeps that and warns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from leantune._utils import parse_bytes

from .live import LiveStorages, OpRecord
from .recompute import MODES, Offloader, mlp_modules, run_layer, tag_mlp, without_cache, worth_saving
from .state import rebind

#: the modes a budget picks from by default (besides ``keep``): the exact ones; DIVISION only when named
DEFAULT_BUDGET_MODES: tuple[str, ...] = ("save_matmuls", "recompute_mlp", "save_attention", "checkpoint", "offload")


@dataclass(frozen=True)
class DeviceCosts:
    """Rates of the cost model: FLOP/s, memory bytes/s, host-link bytes/s, host seconds per op (eager and under a
    selective-checkpoint dispatch mode). Defaults: :func:`default_costs`."""

    flops: float
    bandwidth: float
    host_bandwidth: float
    op_overhead: float
    sac_overhead: float


def default_costs(device: str, dtype: torch.dtype) -> DeviceCosts:
    """Typical rates: an H100-class GPU (bf16 tensor cores at half their peak, PCIe 4 pinned copies) or a few CPU
    cores. Only the ratios between modes matter; they decide choices, never results."""
    if device == "cuda":
        return DeviceCosts(flops=4e14 if dtype in (torch.bfloat16, torch.float16) else 5e13, bandwidth=2e12,
                           host_bandwidth=2.4e10, op_overhead=5e-6, sac_overhead=2e-5)
    # a 2-core CPU (measured with benchmarks/frontier.py): GEMMs run near 4e11 FLOP/s, elementwise ops far below
    # memory speed (bf16 ones convert each element), and a selective-checkpoint dispatch costs ~30 µs an op
    return DeviceCosts(flops=4e11, bandwidth=1e10 if dtype == torch.float32 else 4e9, host_bandwidth=1e10,
                       op_overhead=5e-6, sac_overhead=3e-5)


def _op_time(op: OpRecord, costs: DeviceCosts) -> float:
    return max(op.flops / costs.flops, op.bytes_moved / costs.bandwidth) + costs.op_overhead


def _kept(op: OpRecord, mode: str) -> bool:
    """Whether ``mode`` keeps ``op``'s output (so its backward does not recompute it)."""
    return mode == "keep" or worth_saving(op.op, op.shapes, op.region, mode)


@dataclass
class ModeCost:
    mode: str
    bytes: int       # kept on the device per layer
    extra: float     # seconds of recomputation (and exposed copies) per layer and step
    host_bytes: int = 0


@dataclass
class LayerCosts:
    """One layer's options at one input shape: the modes' bytes and extra seconds, the eager step's seconds."""

    modes: list[ModeCost]
    step: float
    input_bytes: int

    def cost(self, mode: str) -> ModeCost:
        return next(m for m in self.modes if m.mode == mode)


def probe(forward: Callable, layer: nn.Module, args: tuple, kwargs: dict, modes: tuple[str, ...],
          costs: DeviceCosts) -> LayerCosts:
    """Measure ``layer`` in each of ``modes`` on a copy of its input (see the module docstring)."""
    device = args[0].device.type
    # no KV cache: the probe must not write into the real forward's (its K, V are saved by attention anyway)
    args, kwargs = without_cache(args, kwargs)
    per_mode: dict[str, int] = {}
    ops: list[OpRecord] = []
    with _disable_current_modes():  # the probe is invisible to outer dispatch modes (a caller's live counter)
        for mode in ("keep",) + tuple(m for m in modes if m != "keep"):
            ops = _probe_mode(forward, mode, args, kwargs, device, per_mode) or ops
    input_bytes = args[0].numel() * args[0].element_size()
    fwd = sum(_op_time(op, costs) for op in ops)
    trains_base = any(p.requires_grad and p.ndim == 2 and min(p.shape) > 64 for p in _base_weights(layer))
    step = fwd * (1 + (2.0 if trains_base else 1.1))
    result = []
    for mode in modes:
        recomputed = sum(_op_time(op, costs) for op in ops if not _kept(op, mode))
        if mode in ("save_matmuls", "recompute_mlp", "save_attention"):
            recomputed += 2 * len(ops) * costs.sac_overhead
        if mode == "offload":
            exposed = max(0.0, input_bytes / costs.host_bandwidth - fwd)
            result.append(ModeCost(mode, 0, recomputed + exposed, input_bytes))
        elif mode == "division":  # no recomputation: compressing and rebuilding each saved byte, ~12 passes
            result.append(ModeCost(mode, per_mode[mode], 12 * per_mode["keep"] / costs.bandwidth))
        else:
            result.append(ModeCost(mode, per_mode[mode], 0.0 if mode == "keep" else recomputed))
    return LayerCosts(result, step, input_bytes)


def _probe_mode(forward: Callable, mode: str, args: tuple, kwargs: dict, device: str,
                per_mode: dict[str, int]) -> list[OpRecord] | None:
    """Run the layer once in ``mode`` on a copy of its input; store the bytes it keeps; the ops (keep mode)."""
    if mode == "offload":  # nothing stays on the device; its cost is checkpoint's plus the copies
        return None
    live = LiveStorages(device, record_ops=mode == "keep")
    # identity hooks shadow any outer saved-tensor hooks (a profiler's, an offloader's) for the probe's graph
    with live, torch.autograd.graph.saved_tensors_hooks(_same, _same):
        # a fresh leaf like a middle layer's input (requires grad), made inside the counter: counted if kept
        x = args[0].detach().clone().requires_grad_(True)
        out = run_layer(forward, mode, (x,) + tuple(args[1:]), kwargs)
    del x
    per_mode[mode] = live.bytes(exclude=out)  # the output is the next layer's input: counted there
    del out
    live.release()
    return live.ops if mode == "keep" else None


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _base_weights(layer: nn.Module) -> list[torch.Tensor]:
    return [p for name, p in layer.named_parameters() if "lora_" not in name and "adapter" not in name]


def solve(costs: LayerCosts, layers: int, budget_bytes: float) -> list[str]:
    """Per layer, the modes of least total extra time whose bytes sum to at most ``budget_bytes`` (module docstring)."""
    keep = costs.cost("keep")
    frontier: list[ModeCost] = []  # fewest bytes first, each strictly cheaper in time than all leaner ones
    for m in sorted((m for m in costs.modes if m.bytes <= keep.bytes), key=lambda m: (m.bytes, m.extra)):
        if not frontier or m.extra < frontier[-1].extra:
            frontier.append(m)
    hull: list[ModeCost] = []  # from keep towards the leanest, slopes (time per byte saved) increasing
    for m in reversed(frontier):
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], m):
            hull.pop()  # hull[-1] lies above the segment: a mix of its neighbours is cheaper
        hull.append(m)
    assignment = [hull[0].mode] * layers
    level = [0] * layers
    total = layers * hull[0].bytes
    for step in range(1, len(hull)):
        for i in range(layers):
            if total <= budget_bytes:
                return _settle(assignment, i - 1 if i else layers - 1, total, budget_bytes, costs)
            total += hull[step].bytes - hull[level[i]].bytes
            level[i], assignment[i] = step, hull[step].mode
    return assignment


def _settle(assignment: list[str], last: int, total: float, budget_bytes: float, costs: LayerCosts) -> list[str]:
    """The layer moved last may overshoot the budget (layers move whole); give it the cheapest mode that still
    fits, hull or not."""
    current = costs.cost(assignment[last])
    rest = total - current.bytes
    fits = [m for m in costs.modes if rest + m.bytes <= budget_bytes and m.extra < current.extra]
    if fits:
        assignment[last] = min(fits, key=lambda m: (m.extra, m.bytes)).mode
    return assignment


def _slope(a: ModeCost, b: ModeCost) -> float:
    return (b.extra - a.extra) / max(a.bytes - b.bytes, 1)


def parse_budget(budget: Any) -> tuple[str, float]:
    """``("fraction", f)`` for 0 < f ≤ 1 or "25%"; ``("bytes", n)`` for an int or "6GB" / "512MiB"."""
    if isinstance(budget, bool):
        raise ValueError(f"MemoryConfig.budget must be a fraction in (0, 1], '25%' or bytes like '6GB', got {budget!r}")
    if isinstance(budget, float) and 0 < budget <= 1:
        return "fraction", budget
    if isinstance(budget, int) and budget > 1:
        return "bytes", float(budget)
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            try:
                value = float(text[:-1]) / 100
            except ValueError:
                value = 0.0
            if 0 < value <= 1:
                return "fraction", value
        elif (size := parse_bytes(text)) is not None:
            return "bytes", size
    raise ValueError(f"MemoryConfig.budget must be a fraction in (0, 1], '25%' or bytes like '6GB', got {budget!r}")


@dataclass
class BudgetPolicy:
    """The per-model policy: the layers, their original forwards, and the decision per input shape."""

    layers: list[nn.Module]
    forwards: list[Callable]
    budget: Any = None                       # MemoryConfig.budget (None: layer_modes decides)
    layer_modes: tuple[str, ...] | None = None
    allowed: tuple[str, ...] = DEFAULT_BUDGET_MODES
    costs: DeviceCosts | None = None
    device: str | None = None                # plan for this device type (None: where the layer runs)
    verbose: bool = False
    offloader: Offloader = field(default_factory=Offloader)
    decisions: dict[tuple, list[str]] = field(default_factory=dict)
    reports: dict[tuple, list[str]] = field(default_factory=dict)
    layer_costs: dict[tuple, LayerCosts] = field(default_factory=dict)

    def mode_for(self, index: int, args: tuple, kwargs: dict) -> str:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return "keep"
        key = (tuple(x.shape), x.dtype, x.device.type)
        if key not in self.decisions:
            self.decisions[key] = self._decide(key, args, kwargs)
        return self.decisions[key][index]

    def _decide(self, key: tuple, args: tuple, kwargs: dict) -> list[str]:
        n = len(self.layers)
        device = self.device or key[2]
        if self.layer_modes is not None:
            modes = list(self.layer_modes) * n if len(self.layer_modes) == 1 else list(self.layer_modes)
            self.reports[key] = [f"given per layer; {describe_modes(modes)}"]
            return modes
        allowed = tuple(m for m in self.allowed if m != "offload" or device == "cuda")
        if "recompute_mlp" in allowed and not mlp_modules(self.layers[0]):
            allowed = tuple(m for m in allowed if m != "recompute_mlp")
        costs = self.costs or default_costs(device, key[1])
        layer_costs = probe(self.forwards[0], self.layers[0], args, kwargs, ("keep",) + allowed, costs)
        self.layer_costs[key] = layer_costs
        kind, value = parse_budget(self.budget)
        keep = layer_costs.cost("keep").bytes
        target = value * keep * n if kind == "fraction" else value
        modes = solve(layer_costs, n, target)
        got = sum(layer_costs.cost(m).bytes for m in modes)
        extra = sum(layer_costs.cost(m).extra for m in modes)
        line = (f"budget {self.budget}: decoder layers keep {got / 2**20:.1f} MiB of {keep * n / 2**20:.1f} MiB "
                f"({got / max(keep * n, 1):.2f}) at input {tuple(key[0])}, predicted +{extra / (layer_costs.step * n):.1%} "
                f"layer step time; {describe_modes(modes)}")
        self.reports[key] = [line]
        if got > target:
            message = (f"leantune.memory: budget {self.budget} is below what the decoder layers can keep at input "
                       f"{tuple(key[0])} ({got / 2**20:.1f} MiB with every layer in its leanest mode); training goes "
                       f"on with that")
            warnings.warn(message, UserWarning, stacklevel=3)
            self.reports[key].append(message)
        if self.verbose:
            print("leantune.memory: " + "\n".join(self.reports[key]))
        return modes

    def recompute_bytes(self) -> int:
        """The most one recomputed layer holds again during its backward (0 when every layer keeps)."""
        return max((self.layer_costs[key].cost("keep").bytes for key, modes in self.decisions.items()
                    if key in self.layer_costs and any(m != "keep" for m in modes)), default=0)

    def report(self) -> list[str]:
        return [line for lines in self.reports.values() for line in lines]


def describe_modes(modes: list[str]) -> str:
    """``"keep ×3 (layers 3-5), checkpoint ×3 (layers 0-2)"`` style summary, runs of equal modes as ranges."""
    runs: list[tuple[str, int, int]] = []
    for i, m in enumerate(modes):
        if runs and runs[-1][0] == m and runs[-1][2] == i - 1:
            runs[-1] = (m, runs[-1][1], i)
        else:
            runs.append((m, i, i))
    return ", ".join(f"layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {m}" for m, a, b in runs)


def check_modes(modes: Any) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    if not isinstance(modes, (list, tuple)) or not modes or any(m not in MODES for m in modes):
        raise ValueError(f"MemoryConfig.layer_modes must be a mode or a list of modes from {MODES}, got {modes!r}")
    return tuple(modes)


def patch_budget(state, applied, layers: nn.ModuleList) -> bool:
    """Rebind each decoder layer's ``forward`` to run in the mode the policy picks for it (training with gradients
    only; evaluation runs the layer as it is). Refuses a model that already checkpoints its layers itself."""
    config = state.memory
    for layer in layers:
        if layer.__dict__.get("gradient_checkpointing"):
            raise ValueError("leantune.memory: the model checkpoints its layers itself (transformers' activation "
                             "checkpointing) and MemoryConfig(budget=...) would checkpoint them again; call "
                             "model.activation_checkpointing_disable() (the budget policy includes checkpointing), "
                             "or drop the budget")
    policy = BudgetPolicy(list(layers), [layer.forward for layer in layers], budget=config.budget,
                          layer_modes=config.layer_modes, allowed=config.budget_modes, verbose=config.verbose)
    if policy.layer_modes is not None and len(policy.layer_modes) not in (1, len(layers)):
        raise ValueError(f"MemoryConfig.layer_modes: give one mode or one per decoder layer ({len(layers)}), got "
                         f"{len(policy.layer_modes)}")
    for index, layer in enumerate(layers):
        handles = tag_mlp(layer)
        applied.undo.extend(h.remove for h in handles)
        original = policy.forwards[index]

        def forward(module, *args, _index=index, _original=original, **kwargs):
            if not (module.training and torch.is_grad_enabled()):
                return _original(*args, **kwargs)
            mode = policy.mode_for(_index, args, kwargs)
            return run_layer(_original, mode, args, kwargs, policy.offloader)

        rebind(applied, layer, forward)
    state.policy = policy
    applied.undo.append(lambda: setattr(state, "policy", None))
    return True
