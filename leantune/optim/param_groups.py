"""Which parameters get a low-rank projector, and weight-decay groups, the way Trainer/peft users expect.

* ``target_modules``: "all-linear" (every trainable 2-D ``nn.Linear`` / transformers ``Conv1D`` weight except
  the output head, as in peft), a list of module names (matched as whole dotted components, so "q_proj" matches
  "model.layers.0.self_attn.q_proj" and the LoRA factors under it), or a regex string (``re.fullmatch`` on the
  module name, as in peft).
* Everything else trainable goes to plain (full-rank) groups of the same optimizer: weight decay for >= 2-D
  tensors, none for biases and 1-D tensors (norm weights), like ``Trainer.get_decay_parameter_names``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from leantune.kernels.int8_linear import Int8Linear, is_int8_weight


def _linear_types() -> tuple[type, ...]:
    return (nn.Linear, Conv1D, Int8Linear)


def _matches(name: str, target: str | Sequence[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    dotted = f".{name}."
    return any(f".{t}." in dotted for t in target)


def _adapter_matrices(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Trainable 2-D tensors that peft tuner layers keep in ParameterDicts (leantune's adapters: R, A, B …).

    Keyed by parameter name, with the owning tuner-layer module name, so they can be targeted like linears.
    """
    found: dict[str, tuple[str, nn.Parameter]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for pname, p in module.named_parameters(recurse=True):
            if p.requires_grad and p.ndim == 2 and not pname.startswith("base_layer.") and ".weight" not in pname:
                found[f"{name}.{pname}"] = (name, p)
    return found


def find_target_weights(model: nn.Module, target_modules: str | Sequence[str] = "all-linear") -> dict[str, nn.Parameter]:
    """Map parameter name -> tensor for every trainable 2-D linear weight selected by ``target_modules``.

    On a peft model this includes the adapter matrices of tuner layers that hold them as plain parameters
    (leantune's adapters), matched by the adapted module's name.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, nn.Parameter] = {}
    linear_names: list[str] = []
    for pname, (module_name, p) in _adapter_matrices(model).items():
        linear_names.append(module_name)
        if target_modules == "all-linear" or _matches(module_name, target_modules):
            found[pname] = p
    for name, module in model.named_modules():
        if not isinstance(module, _linear_types()):
            continue
        w = module.weight
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or not (w.requires_grad or is_int8_weight(w)):
            continue  # an INT8 weight trains through its float gradient ``qgrad`` (optim/qgalore.py)
        linear_names.append(name)
        if target_modules == "all-linear":
            if module is head:
                continue
        elif not _matches(name, target_modules):
            continue
        found[f"{name}.weight"] = w
    if not found:
        if not linear_names:
            shapes = sorted({tuple(p.shape) for p in model.parameters() if p.requires_grad}, key=len)[:6]
            raise ValueError(
                f"{type(model).__name__} trains no 2-D linear weight, so a low-rank optimizer has nothing to project "
                f"(NOLA trains 1-D coefficients, Compacter 3-D PHM factors): use the default AdamW (no optimizer=) or "
                f"adapt linear layers (trainable tensor shapes: {shapes}).")
        shown = ", ".join(linear_names[:12]) + (" ..." if len(linear_names) > 12 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no trainable 2-D linear weight in {type(model).__name__}. "
            f"Trainable linear modules: [{shown}]. Pass names from this list, a regex, or 'all-linear'."
        )
    return found


def make_param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    rank: int | None = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    projector: str | None = None,
    weight_decay: float = 0.0,
    low_rank_weight_decay: float | None = None,
    **low_rank_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for the low-rank optimizers: [decay, no-decay, low-rank] (empty groups dropped).

    Parameters are given as ``(name, tensor)`` pairs, so the groups carry torch's ``param_names`` and errors about a
    parameter name it.

    ``low_rank_options`` (e.g. ``moment_policy``, ``max_grad_norm_per_param``) go into the low-rank group only;
    ``projector`` None leaves the optimizer's default, ``rank`` None marks the group for methods without a rank
    (Conda).
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    targets = find_target_weights(model, target_modules)
    target_ids = {id(p) for p in targets.values()}
    decay, no_decay, seen = [], [], set(target_ids)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear once
        (no_decay if (p.ndim < 2 or name.endswith("bias")) else decay).append((name, p))
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {
            "params": list(targets.items()),
            "weight_decay": weight_decay if low_rank_weight_decay is None else low_rank_weight_decay,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            **({} if projector is None else {"projector": projector}),
            **low_rank_options,
        },
    ]
    return [g for g in groups if g["params"]]
