"""Fold a norm's affine (γ, β) into the following frozen linears, undo it, and convert adapters back.

Folding. A norm computes ``u = γ ⊙ ŷ + β`` (ŷ the normalised row; Gemma uses ``1 + w`` as γ) and a following
linear computes ``W u + b``. Then

    W u + b = (W diag(γ)) ŷ + (W β + b)  =:  W' ŷ + b',

so the norm can drop its affine and hand ŷ itself to the linear (which saves ŷ anyway: memory sharing). ``W'`` and
``b'`` are computed in float64 and cast back to the weight dtype. GPT-2's ``Conv1D`` stores ``Wᵀ`` ([in, out]), so
there ``W'ᵀ = diag(γ) Wᵀ`` and ``b' = b + βᵀ Wᵀ``.

Adapters on the folded linear keep their own parameterisation: they compute ``ΔW u = ΔW diag(γ) ŷ + ΔW β`` from
ŷ (``diag γ`` applied to their input-side factor, ``ΔW β`` a parameter-only vector), see
:mod:`leantune.patching.folding_patch`. :func:`unfold_delta` is the conversion for a delta ``ΔW'`` that *was*
trained in the folded parameterisation (``ΔW' ŷ`` written in ``u``):

    ΔW' ŷ = (ΔW' diag(γ)⁻¹) u − ΔW' diag(γ)⁻¹ β   =>   ΔW = ΔW' diag(1/γ),   Δb = −ΔW β.

Norms with some ``|γ| < 1e-6`` are never folded (undoing it would divide by ~0).
"""

from __future__ import annotations

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


def _host(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """A CPU copy of ``t`` for the record; meta tensors (``leantune plan`` builds models on meta) stay meta."""
    return t.detach() if t.is_meta else t.detach().to("cpu", copy=copy)


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
    if bt is not None and (bt.is_meta or bool(bt.any())):  # meta (leantune plan): values unknown
        shift = bt @ w64 if conv else w64 @ bt
        new_b = shift if old_bias is None else old_bias.detach().to(torch.float64) + shift
    record = FoldRecord(
        linear_name=name, gamma=_host(gamma), beta=None if beta is None else _host(beta),
        original_weight=_host(weight, copy=True) if keep_original else None,
        original_bias=None if old_bias is None or not keep_original else _host(old_bias, copy=True),
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


def save_unfolded_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default") -> str:
    """Save the adapter of a model patched by :func:`leantune.memory.apply` for the user's original base model.

    Folding never changes the adapters' own parameters (the consumers' adapters read ŷ through ``diag γ`` and add
    their ``β`` term at run time, see :mod:`leantune.patching.folding_patch`), so this is ``model.save_pretrained``:
    the files load with ``PeftModel.from_pretrained(original_base, save_directory)`` for every adapter type.
    """
    model.save_pretrained(save_directory, selected_adapters=[adapter_name])
    return save_directory
