"""Fold a norm's affine (γ, β) into the following frozen linears, undo it, and convert adapters back.

Folding. A norm computes ``u = γ ⊙ ŷ + β`` (ŷ the normalised row; Gemma uses ``1 + w`` as γ) and a following
linear computes ``W u + b``. Then

    W u + b = (W diag(γ)) ŷ + (W β + b)  =:  W' ŷ + b',

so the norm can drop its affine and hand ŷ itself to the linear (which saves ŷ anyway: memory sharing). ``W'`` and
``b'`` are computed in float64 and cast back to the weight dtype. GPT-2's ``Conv1D`` stores ``Wᵀ`` ([in, out]), so
there ``W'ᵀ = diag(γ) Wᵀ`` and ``b' = b + βᵀ Wᵀ``.

Adapters trained on the folded model. A low-rank adapter on the folded linear adds ``ΔW' ŷ``. Written in the
original input ``u`` (ŷ = diag(γ)⁻¹ (u − β)):

    ΔW' ŷ = (ΔW' diag(γ)⁻¹) u − ΔW' diag(γ)⁻¹ β   =>   ΔW = ΔW' diag(1/γ),   Δb = −ΔW β.

For peft LoRA (``ΔW' = s · B A'``) this is ``A = A' diag(1/γ)`` (B unchanged) plus, when β ≠ 0, a bias
``−B A β`` on ``lora_B`` (peft ``lora_bias=True``; peft multiplies it by ``s`` like the rest of the branch).
RMSNorm has β = 0, so Llama-family adapters convert by rescaling ``A`` alone. Norms with some ``|γ| < 1e-6`` are
never folded (the conversion would divide by ~0).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

GAMMA_TOLERANCE = 1e-6


def base_layer(module: nn.Module) -> nn.Module:
    """The innermost layer holding the frozen weight (unwraps peft ``base_layer`` chains)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def is_conv1d(layer: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (weight stored as [in, out])."""
    return type(layer).__name__ == "Conv1D"


def norm_affine(norm: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(γ, β) of a norm module in float64; Gemma-style norms (``kind == "gemma"``) scale by ``1 + w``."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"norm {type(norm).__name__} has no affine weight; nothing to fold")
    gamma = weight.detach().to(torch.float64)
    if kind == "gemma":
        gamma = 1.0 + gamma
    bias = getattr(norm, "bias", None)
    beta = None if bias is None else bias.detach().to(torch.float64)
    return gamma, beta


def norm_eps(norm: nn.Module) -> float:
    """The ε of an HF / torch norm module (``eps``, ``variance_epsilon`` or ``epsilon``)."""
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, (float, int)):
            return float(value)
    raise ValueError(f"cannot find the epsilon of norm {type(norm).__name__} (looked for eps/variance_epsilon)")


@dataclass
class FoldRecord:
    """What was done to one linear, enough to undo it and to convert adapters back (γ, β in float64, on CPU)."""

    linear_name: str
    gamma: torch.Tensor
    beta: torch.Tensor | None
    original_weight: torch.Tensor | None  # CPU copy (None when keep_original_weights=False)
    original_bias: torch.Tensor | None
    created_bias: bool


def fold_into_linear(name: str, module: nn.Module, gamma: torch.Tensor, beta: torch.Tensor | None,
                     keep_original: bool = True) -> FoldRecord:
    """Replace ``W, b`` of ``module``'s base layer by ``W diag(γ), b + W β`` (float64 math, cast back)."""
    layer = base_layer(module)
    weight = layer.weight
    w64 = weight.detach().to(torch.float64)
    g, bt = gamma.to(w64.device), None if beta is None else beta.to(w64.device)
    conv = is_conv1d(layer)
    new_w = g[:, None] * w64 if conv else w64 * g[None, :]
    old_bias = layer.bias
    new_b = None
    if bt is not None and bool(bt.any()):
        shift = bt @ w64 if conv else w64 @ bt
        new_b = shift if old_bias is None else old_bias.detach().to(torch.float64) + shift
    record = FoldRecord(
        linear_name=name, gamma=gamma.detach().cpu(), beta=None if beta is None else beta.detach().cpu(),
        original_weight=weight.detach().to("cpu", copy=True) if keep_original else None,
        original_bias=None if old_bias is None or not keep_original else old_bias.detach().to("cpu", copy=True),
        created_bias=old_bias is None and new_b is not None,
    )
    with torch.no_grad():
        weight.copy_(new_w.to(weight.dtype))
        if new_b is not None:
            if old_bias is None:
                layer.bias = nn.Parameter(new_b.to(weight.dtype), requires_grad=False)
            else:
                old_bias.copy_(new_b.to(old_bias.dtype))
    return record


def unfold_linear(module: nn.Module, record: FoldRecord) -> None:
    """Undo :func:`fold_into_linear` (exactly from the kept copy, else by dividing by γ in float64)."""
    layer = base_layer(module)
    weight = layer.weight
    with torch.no_grad():
        if record.original_weight is not None:
            weight.copy_(record.original_weight.to(weight.device))
        else:
            w64, g = weight.detach().to(torch.float64), record.gamma.to(weight.device)
            orig = w64 / g[:, None] if is_conv1d(layer) else w64 / g[None, :]
            weight.copy_(orig.to(weight.dtype))
        if record.created_bias:
            layer.bias = None
        elif layer.bias is not None and record.beta is not None:
            if record.original_bias is not None:
                layer.bias.copy_(record.original_bias.to(layer.bias.device))
            else:
                w64 = weight.detach().to(torch.float64)
                b = record.beta.to(w64.device)
                shift = b @ w64 if is_conv1d(layer) else w64 @ b
                layer.bias.copy_((layer.bias.detach().to(torch.float64) - shift).to(layer.bias.dtype))


def unfold_delta(delta_weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert an adapter delta trained on a folded linear back to the original model.

    ``delta_weight`` is ``ΔW'`` in [out, in] layout (what ``get_delta_weight`` returns for nn.Linear bases).
    Returns ``(ΔW, Δb)`` with ``ΔW = ΔW' diag(1/γ)`` and ``Δb = −ΔW β`` (``None`` when β is absent or zero).
    """
    g = gamma.to(device=delta_weight.device, dtype=torch.float64)
    if bool((g.abs() < GAMMA_TOLERANCE).any()):
        raise ValueError("unfold_delta: some |γ| < 1e-6; the folded adapter cannot be expressed on the original model")
    dw = delta_weight.to(torch.float64) / g[None, :]
    db = None
    if beta is not None and bool(beta.any()):
        db = -(dw @ beta.to(device=dw.device, dtype=torch.float64))
    return dw.to(delta_weight.dtype), None if db is None else db.to(delta_weight.dtype)


def _fold_records(model: nn.Module) -> dict[int, FoldRecord]:
    from .architectures import hf_model

    handle = getattr(hf_model(model), "_leantune_memory_handle", None)
    return {} if handle is None else {id(m): r for m, r in handle.fold_records}


def unfold_adapter_state(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], bool]:
    """peft LoRA state dict of ``model`` (a peft model patched by :func:`leantune.memory.apply`) expressed
    against the original, unfolded base model.

    Returns ``(state_dict, needs_lora_bias)``: keys as ``peft.get_peft_model_state_dict`` writes them; for every
    LoRA layer sitting on a folded linear ``lora_A.weight ← A' diag(1/γ)``; if any folded norm has β ≠ 0, every
    LoRA layer gets a ``lora_B.bias`` (``−B A β`` where folded, zeros elsewhere) and the adapter must be loaded
    with ``LoraConfig(lora_bias=True)`` (:func:`save_unfolded_adapter` writes that into the config).
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    records = _fold_records(model)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    needs_bias = any(r.beta is not None and bool(r.beta.any()) for r in records.values())
    for name, layer in lora_layers:
        key_a, key_bias = f"{name}.lora_A.weight", f"{name}.lora_B.bias"
        if key_a not in state:
            raise KeyError(f"unfold_adapter_state: {key_a} missing from the peft state dict (adapter {adapter_name!r})")
        record = records.get(id(layer))
        if record is None:
            if needs_bias and key_bias not in state:
                out_features = layer.lora_B[adapter_name].weight.shape[0]
                state[key_bias] = torch.zeros(out_features, dtype=state[key_a].dtype)
            continue
        a_folded = state[key_a]
        g = record.gamma.to(torch.float64)
        if bool((g.abs() < GAMMA_TOLERANCE).any()):
            raise ValueError(f"{name}: some |γ| < 1e-6, cannot express the adapter on the unfolded model")
        a_orig = a_folded.to(torch.float64) / g[None, :]
        state[key_a] = a_orig.to(a_folded.dtype)
        if needs_bias:
            b = layer.lora_B[adapter_name].weight.detach().cpu().to(torch.float64)
            old = state.get(key_bias)
            shift = torch.zeros(b.shape[0], dtype=torch.float64)
            if record.beta is not None:
                shift = -(b @ (a_orig @ record.beta.to(torch.float64)))
            state[key_bias] = ((0 if old is None else old.to(torch.float64)) + shift).to(a_folded.dtype)
    return state, needs_bias


def save_unfolded_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default") -> str:
    """Write a standard peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that applies to the
    user's original base model, converting from the folded parameterisation (see module docstring)."""
    from safetensors.torch import save_file

    state, needs_bias = unfold_adapter_state(model, adapter_name)
    config = model.peft_config[adapter_name]
    os.makedirs(save_directory, exist_ok=True)
    config_dict = config.to_dict()
    if needs_bias:
        config_dict["lora_bias"] = True
    for key, value in list(config_dict.items()):
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    with open(os.path.join(save_directory, "adapter_config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, default=str)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(save_directory, "adapter_model.safetensors"))
    return save_directory
