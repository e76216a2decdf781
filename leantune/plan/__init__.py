"""``leantune plan``: will a fine-tuning job fit, and with which stack? Predicted per GPU, with nothing allocated.

The model is built from its config on the ``meta`` device, with the adapter, memory options and gradient
checkpointing it will train with; then

* weights: every parameter in its dtype, bitsandbytes 4/8-bit bases by their storage formula (``estimate.py``);
* adapter parameters and gradients: the trainable tensors (per-layer updates: one parameter's gradient at a time);
* optimizer state: each optimizer's layout (``estimate.py``; the same figure ``optimizer_state_bytes`` measures);
* saved activations: one forward traced on ``meta`` (``trace.py``), as ``leantune.memory.profile`` measures a step;
* peak: weights + optimizer state + the larger of (saved activations + the fp32 logits and their gradient) and
  (all gradients + the optimizer step's temporaries), the two moments a step's memory is highest.

With ``processes=N, fsdp=True`` weights, gradients and optimizer state are divided by N (FSDP shards them) — but
for bitsandbytes' absmax / row scales, which live beside the 4/8-bit codes and stay whole on every rank; saved
activations are not divided. Validated against measurement on the CPU (``tests/plan/test_plan.py``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from peft import get_peft_model
from torch import nn

from leantune._utils import parse_bytes
from leantune.adapters import ADAPTERS
from leantune.kernels.chunked_loss import cpu_floor, default_chunk
from leantune.kernels.int8_linear import is_int8_weight
from leantune.memory import MemoryConfig, apply, enable_checkpointing
from leantune.optim import OPTIMIZERS, OptimizerConfig, QuZOConfig
from leantune.optim.config import quantize_model_weights
from leantune.optim.offload import host_is_cheaper
from leantune.optim.param_groups import find_target_weights
from leantune.patching.state import state_of
from leantune.plan.estimate import (
    grad_bytes,
    optimizer_state_bytes,
    replicated_state_bytes,
    requantize_bytes,
    weight_bytes,
    zeroth_order_step_bytes,
)
from leantune.plan.options import (
    MEMORY_OPTIONS,
    _budget_value,
    _check_fsdp,
    _check_optimizer_options,
    parse_memory,
    parse_spec,
)
from leantune.plan.presets import PRESETS, config_from
from leantune.plan.trace import live_bytes, saved_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["MEMORY_OPTIONS", "PRESETS", "Plan", "plan", "parse_spec"]


@dataclass
class Plan:
    """Predicted bytes per GPU of one training configuration; ``str()`` is a table, :meth:`to_json` the numbers."""

    model: str
    setting: dict[str, Any]
    weights: int
    quantized_weights: int
    trainable_parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int
    peak: int
    gpu_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.peak <= self.gpu_bytes

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits}

    def __str__(self) -> str:
        gib = 2**30
        rows = [("weights", self.weights), ("  of which quantized", self.quantized_weights),
                ("gradients", self.gradients), ("optimizer state", self.optimizer_state),
                ("saved activations", self.activations), ("logits + loss transient", self.transient),
                ("peak", self.peak)]
        out = [f"{self.model}: " + ", ".join(f"{k}={v}" for k, v in self.setting.items()),
               f"trainable parameters: {self.trainable_parameters:,}", "", "| component | GiB |", "|---|---:|"]
        out += [f"| {name} | {value / gib:.2f} |" for name, value in rows]
        if self.gpu_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"\n{verdict} in {self.gpu_bytes / 1e9:.0f} GB per GPU (peak {self.peak / 1e9:.1f} GB)")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _adapter_config(name: str, options: dict[str, Any], task: str):
    configs = ADAPTERS
    if name not in configs:
        raise ValueError(f"unknown adapter {name!r}; choose one of {sorted(configs)}")
    fields = {f.name: f for f in dataclasses.fields(configs[name]) if f.init and f.name not in ("task_type", "peft_type")}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"adapter {name!r} has no option(s) {unknown}; its options: {sorted(fields)}")
    for key, value in options.items():  # peft's configs do not check the type of every number (r='abc' would fail
        default = fields[key].default      # deep inside the injection)
        expected = {bool: (bool,), int: (int,), float: (int, float)}.get(type(default))
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and type(default) is not bool)):
            raise ValueError(f"adapter {name!r}: {key} must be {type(default).__name__}, got {value!r}")
    options = {"target_modules": "all-linear", **options} if "target_modules" in fields else options
    if name == "lora":
        options.setdefault("lora_dropout", 0.0)
    try:
        config = configs[name](task_type=task, **options)
    except TypeError as err:  # a value of the wrong type that the config's own checks did not name
        raise ValueError(f"adapter {name!r}: {err}") from None
    if callable(getattr(config, "placeholder_init", None)):  # e.g. LoRA-SB's factors come from a gradient
        config.placeholder_init()                             # estimate; for shapes and bytes placeholders do
    return config


def build_model(config, dtype: torch.dtype, task: str, device: str = "meta"):
    auto = {"CAUSAL_LM": transformers.AutoModelForCausalLM, "SEQ_CLS": transformers.AutoModelForSequenceClassification}
    with torch.device(device):
        try:
            return auto[task].from_config(config, dtype=dtype)
        except ValueError as err:
            raise ValueError(f"model type {config.model_type!r} has no {task} head in transformers "
                             f"({str(err).splitlines()[0]})") from None


def plan(model: str | dict, seq: int = 512, batch: int = 1, dtype: str = "bf16", adapter: str | None = None,
         optimizer: str = "adamw", memory: str = "none", quant: str | None = None, gpu: str | float | None = None,
         processes: int = 1, fsdp: bool = False, task: str | None = None, device: str = "cuda",
         offload_optimizer: bool = False) -> Plan:
    """Predict the memory of one training step (module docstring). ``adapter``/``optimizer``: ``name:key=value,…``
    (``lora:r=16``, ``galore_adamw:rank=256,layerwise=true``); ``memory``: one of :data:`MEMORY_OPTIONS`;
    ``quant``: None, "4bit" or "8bit" (needs an adapter: the base is frozen); ``gpu``: "24GB" or bytes;
    ``device``: "cuda" (torch's AdamW steps all tensors at once there, with temporaries the size of all gradients)
    or "cpu" (one tensor at a time). ``offload_optimizer``: the state of a leantune optimizer in host memory between
    updates (``OptimizerConfig(offload="cpu")``): the GPU holds the stepping parameter's and the next one's."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    memory_name, budget = parse_memory(memory)
    if quant not in (None, "4bit", "8bit"):
        raise ValueError(f"quant must be 4bit or 8bit, got {quant!r}")
    if quant and adapter is None:
        raise ValueError("a quantized base cannot be trained: give an adapter (e.g. lora:r=16) with --quant")
    for name, value in (("seq", seq), ("batch", batch), ("processes", processes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    notes: list[str] = []
    net, config, task = prepare(model, dtype, adapter, memory, task)
    if budget is not None:
        state_of(net).policy.device = device  # costs (and offload) of the device planned for
    optimizer_name, optimizer_options = parse_spec(optimizer)
    _check_possible(net, adapter, optimizer_name, optimizer_options, quant)
    zeroth = optimizer_name == "quzo"  # forward passes only: no gradients, no saved activations, no state
    if zeroth and (fsdp or offload_optimizer or optimizer_options.get("layerwise") or budget is not None):
        raise ValueError("optimizer 'quzo' runs forward passes only (no gradients, no optimizer state, nothing saved "
                         "for backward): --fsdp, --offload-optimizer, layerwise=true and an activation budget do not "
                         "apply; drop them (QuZO under several GPUs: DDP, --processes N without --fsdp)")
    if optimizer_name in OPTIMIZERS:  # Q-GaLore trains INT8 weights: make them, as build_optimizer does
        quantize_model_weights(net, OptimizerConfig(
            optimizer_name, target_modules=optimizer_options.get("target_modules", "all-linear"),
            optimizer_kwargs={k: v for k, v in optimizer_options.items() if k == "int8_weights"}))
    trainable = [p for p in net.parameters() if p.requires_grad or is_int8_weight(p)]
    weights, quantized, scales = weight_bytes(net, quant)
    compute = torch.empty((), dtype=DTYPES[dtype]).element_size()
    grads = 0 if zeroth else sum(grad_bytes(p, compute) for p in trainable)
    layerwise = bool(optimizer_options.pop("layerwise", False))
    if layerwise:
        grads = max((grad_bytes(p, compute) for p in trainable), default=0)
    state = 0 if zeroth else _optimizer_state(net, optimizer_name or "adamw", optimizer_options, trainable)
    replicated = 0 if zeroth else _optimizer_state(net, optimizer_name or "adamw", optimizer_options, trainable,
                                                   replicated_state_bytes)
    if fsdp and processes > 1:
        _check_fsdp(optimizer_name, optimizer_options, layerwise)
    if offload_optimizer:
        if optimizer_name in (None, "adamw", "adamw8bit"):
            raise ValueError("--offload-optimizer keeps a leantune optimizer's state on the host; give one with "
                             "--optimizer (e.g. galore_adamw8bit:rank=1024,layerwise=true)")
        # the stepping parameter's state and the prefetched next one's, in backward order (the reverse of the
        # parameters' order, as their gradients become ready)
        # (offload_step="auto": a parameter whose update moves fewer bytes on the host steps there, its state never
        # on the GPU — leantune.optim.offload.host_is_cheaper)
        per_param = [_optimizer_state(net, optimizer_name, optimizer_options, [p]) for p in reversed(trainable)]
        per_param = [0 if p.is_floating_point() and host_is_cheaper(s, p.numel() * p.element_size(),
                                                                    grad_bytes(p, compute)) else s
                     for s, p in zip(per_param, reversed(trainable))]
        on_gpu = max((a + b for a, b in zip(per_param, per_param[1:])), default=sum(per_param))
        notes.append(f"optimizer state on the host: {state / 1e9:.2f} GB (pinned); on the GPU at most "
                     f"{on_gpu / 1e9:.2f} GB (two consecutive parameters' state; parameters whose update is "
                     "cheaper on the host step there)")
        state = on_gpu
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "labels": ids if task == "CAUSAL_LM" else torch.zeros(batch, dtype=torch.long,
                                                                                      device="meta")}
    if zeroth:
        activations = 0
        notes.append("QuZO: two forward passes per step under no_grad; memory is inference memory")
    elif budget is None:
        activations = saved_bytes(net, inputs, device=device)
    else:  # checkpoint frames and selective caches hold what saved-tensor hooks do not see
        activations = live_bytes(net, inputs, device=device)
        notes.append(_policy_note(net))
    vocab = getattr(config, "vocab_size", 0) if task == "CAUSAL_LM" else 0
    if vocab and "chunked_loss" in memory_name:  # one chunk's logits z and ∂L/∂z: fp32, + dtype copies if 16-bit
        element = torch.empty((), dtype=DTYPES[dtype]).element_size()
        chunk = default_chunk(batch * seq, vocab, config.hidden_size, cpu_floor(device))
        per_logit = 8 + (2 * element if element != 4 else 0)
        transient = chunk * vocab * per_logit + batch * seq * 4  # + the per-token log-sum-exp
    elif zeroth:  # no gradient: the logits in the dtype, the fp32 copy the loss makes (16-bit), its log-softmax
        element = torch.empty((), dtype=DTYPES[dtype]).element_size()
        transient = batch * seq * vocab * (element + 4 + (4 if element != 4 else 0))
    else:
        transient = 2 * batch * seq * vocab * 4  # the fp32 logits the loss upcasts, and their gradient
    shard = processes if fsdp else 1
    # FSDP shards the 4/8-bit codes; bitsandbytes keeps their absmax / row scales whole on every rank
    # FSDP shards W's rows and what follows them; a low-rank optimizer keeps r × n tensors whole on every rank
    # (optim/sharded.py) unless shard_replicated divides them
    weights_s, grads_s = (weights - scales) // shard + scales, grads // shard
    state_s = (state - replicated) // shard + replicated if shard > 1 else state
    largest = max((grad_bytes(p, compute) for p in trainable), default=0)
    step_temporaries = grads_s if optimizer_name in (None, "adamw") and device == "cuda" else largest
    requantize = max((requantize_bytes(p, compute) for p in trainable if is_int8_weight(p)), default=0)
    # per-layer: an INT8 weight is requantized inside backward, once the loss's transient and the last layer's
    # activations are gone, so it does not add to the backward peak (measured: tests/plan)
    step_temporaries = max(step_temporaries, requantize)
    if zeroth:
        step_temporaries = zeroth_order_step_bytes(trainable, optimizer_options.get("bits", QuZOConfig.bits),
                                                   optimizer_options.get("weight_bits"))
    # a recomputed layer's backward holds that layer's activations again (as kept without the policy)
    recompute = state_of(net).policy.recompute_bytes() if budget is not None else 0
    peak = weights_s + state_s + max(activations + max(transient, recompute) + (grads_s if layerwise else 0),
                                     (0 if layerwise else grads_s) + step_temporaries)
    if processes > 1 and not fsdp:
        notes.append("DDP keeps a full replica per GPU (and a gradient-bucket copy, not counted)")
    setting = {"seq": seq, "batch": batch, "dtype": dtype, "adapter": adapter or "none (full fine-tuning)",
               "optimizer": optimizer, "memory": memory, "quant": quant or "none", "processes": processes,
               "fsdp": fsdp}
    setting["offload_optimizer"] = offload_optimizer
    return Plan(str(model), setting, weights_s, (quantized - scales) // shard + scales, sum(p.numel() for p in trainable), grads_s,
                state_s, activations, transient, peak, _gpu_bytes(gpu), notes)


def _policy_note(net) -> str:
    policy = state_of(net).policy
    return "activation budget: " + ("; ".join(policy.report()) if policy.report() else "not decided")


def prepare(model: str | dict, dtype: str = "bf16", adapter: str | None = None, memory: str = "none",
            task: str | None = None, device: str = "meta"):
    """``(model, config, task)``: the model as it will train — from its config on ``device`` (meta for planning),
    with the adapter, leantune memory options (and activation budget) and gradient checkpointing, in training
    mode."""
    memory, budget = parse_memory(memory)
    config = config_from(model)
    task = task or ("SEQ_CLS" if any("SequenceClassification" in a for a in (config.architectures or []))
                    else "CAUSAL_LM")
    net = build_model(config, DTYPES[dtype], task, device)
    adapter_name, adapter_options = parse_spec(adapter)
    if adapter_name:
        with torch.device(device):  # adapters created where the model is (meta: nothing allocated, any rank)
            net = get_peft_model(net, _adapter_config(adapter_name, adapter_options, task))
    if memory.startswith("leantune"):
        apply(net, MemoryConfig(keep_original_weights=False, chunked_loss=memory.endswith("chunked_loss"),
                                budget=None if budget is None else _budget_value(budget)))
    elif budget is not None:
        apply(net, MemoryConfig.none(keep_original_weights=False, budget=_budget_value(budget)))
    if "checkpointing" in memory:
        enable_checkpointing(net)
    net.train()
    return net, config, task


def _check_possible(net, adapter: str | None, optimizer: str | None, options: dict[str, Any],
                    quant: str | None) -> None:
    """Refuse what cannot be built: a rank above a targeted matrix's smaller side, 4/8-bit bases without a
    quantizable nn.Linear."""
    _check_optimizer_options(optimizer or "adamw", options)
    _, adapter_options = parse_spec(adapter)
    r = adapter_options.get("r")
    if isinstance(r, int):
        for name, module in net.named_modules():
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(base, "weight") and base.weight.ndim == 2 and r > min(base.weight.shape):
                raise ValueError(f"adapter rank r={r} exceeds the smaller side of {name} {tuple(base.weight.shape)}")
    if optimizer and "rank" in options:
        for name, p in find_target_weights(net, options.get("target_modules", "all-linear")).items():
            if options["rank"] > min(p.shape):
                raise ValueError(f"optimizer rank={options['rank']} exceeds the smaller side of {name} {tuple(p.shape)}")
    if quant and not any(isinstance(m, nn.Linear) and not m.weight.requires_grad for m in net.modules()):
        raise ValueError(f"--quant {quant}: bitsandbytes quantizes frozen nn.Linear layers and this model has none "
                         "(e.g. GPT-2's Conv1D)")


def _optimizer_state(net, name: str, options: dict[str, Any], trainable: list[torch.Tensor],
                     formula=optimizer_state_bytes) -> int:
    if name in ("adamw", "adamw8bit"):
        return formula(name, trainable, set())
    spec = OPTIMIZERS[name]
    rank = options.get("rank", spec.rank)
    targets = find_target_weights(net, options.get("target_modules", "all-linear"))
    return formula(name, trainable, {id(p) for p in targets.values()}, rank=rank, projector=options.get("projector"),
                   options=options)


def _gpu_bytes(gpu: str | float | None) -> int | None:
    if gpu is None:
        return None
    if isinstance(gpu, (int, float)):
        return int(gpu)
    size = parse_bytes(gpu) if isinstance(gpu, str) else None
    if size is not None:
        return int(size)
    raise ValueError(f"gpu must look like '24GB' or '80GB', got {gpu!r}")


def to_json(result: Plan) -> str:
    return json.dumps(result.to_json(), indent=2)
