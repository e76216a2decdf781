"""``leantune.kernels.apply`` / ``restore``: the kernels view of the one patcher, beside the memory view
(:mod:`.memory_view`).

Kernel names (what each switches on; the patcher's table says which patch wins where memory options also apply):

* ``"lora_linear"`` — peft ``lora.Linear`` → the fused adapter linear (Y = X Wᵀ + s (X Aᵀ) Bᵀ + b). Per call it
  falls back to peft's own forward whenever the fused math would differ: merged or disabled adapters, several
  active adapters, DoRA/other variants, LoRA dropout active in training, ``lora_bias``, ``fan_in_fan_out``, a
  non-``nn.Linear`` (e.g. 4-bit) base, mixed dtypes, a patched LoRA-A (VeLoRA, a folded norm) or extra kwargs.
* ``"lowrank_linear"`` — leantune's low-rank tuners → the same fused linear with the layer's ``forward_factors``
  (methods with their own autograd function — ALLoRA, NOLA in training — keep it).
* ``"ms_rmsnorm"`` / ``"ms_layernorm"`` — RMSNorm / LayerNorm modules → ``γ ⊙ MS-norm(x) + β``.
* ``"gated_mlp"`` — gated MLPs (``gate_proj``/``up_proj``/``down_proj``/``act_fn``) → the fused MLP op.
* ``"regelu2"`` / ``"resilu2"`` (opt-in, **approximate gradients**) — GELU / SiLU modules → 2-bit backward.

The first five are exact (same forward and gradients up to rounding); the default set is those. With
``enable=None`` kernels are on only if the model has CUDA parameters and Triton is importable, so on a CPU nothing
changes and there is no overhead. Each op dispatches with :func:`~leantune.kernels.dispatch.kernel_for`: Triton
for CUDA tensors, the torch reference (C loops where they exist) otherwise.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from leantune.kernels.dispatch import triton_available

from .options import ALL_KERNELS, APPROXIMATE_KERNELS, EXACT_KERNELS  # noqa: F401  (leantune.kernels' names)
from .patcher import configure
from .state import state_of

# which applied patches each kernel name covers: (site type, patch kind, predicate on the site)
_COVERS = {
    "lora_linear": ("adapter", "fused", lambda site: hasattr(site[1], "lora_A")),
    "lowrank_linear": ("adapter", "fused", lambda site: not hasattr(site[1], "lora_A")),
    "ms_rmsnorm": ("norm", None, lambda site: site.op_kind == "rmsnorm"),
    "ms_layernorm": ("norm", None, lambda site: site.op_kind == "layernorm"),
    "gated_mlp": ("mlp", "fused", lambda site: True),
    "regelu2": ("activation", "approx", lambda site: site.kind == "gelu"),
    "resilu2": ("activation", "approx", lambda site: site.kind == "silu"),
}


def _resolve(model: nn.Module, enable: bool | Iterable[str] | None, disable: Iterable[str]) -> list[str]:
    disable = list(disable)
    unknown = [n for n in disable if n not in ALL_KERNELS]
    if enable is None:
        on_cuda = any(p.is_cuda for p in model.parameters())
        names = list(EXACT_KERNELS) if on_cuda and triton_available() else []
    elif enable is True:
        names = list(EXACT_KERNELS)
    elif enable is False:
        names = []
    else:
        names = list(enable)
        unknown += [n for n in names if n not in ALL_KERNELS]
    if unknown:
        raise ValueError(f"leantune.kernels.apply: unknown kernel name(s) {unknown}; known: {list(ALL_KERNELS)}")
    return [n for n in names if n not in disable]


def _covered(model: nn.Module, name: str) -> list[int]:
    """ids of the modules whose applied patch runs kernel ``name``'s op."""
    state = state_of(model)
    if state is None or name not in state.kernels:
        return []
    site_type, kind, matches = _COVERS[name]
    return [key[1] for key, a in state.applied.items()
            if key[0] == site_type and a.kind is not None and (kind is None or a.kind == kind) and matches(a.site)]


def apply(model: nn.Module, enable: bool | Iterable[str] | None = None, disable: Iterable[str] = ()) -> dict[str, int]:
    """Switch leantune kernels on for ``model`` (replacing an earlier kernel set); returns how many modules each
    kernel covers.

    Args:
        model: any ``nn.Module`` (a transformers model, a peft ``PeftModel``, ...).
        enable: ``None`` — the exact kernels if the model has CUDA parameters and Triton is importable, else none;
            ``True`` — the exact kernels (``EXACT_KERNELS``) on any device (CPU calls use the torch references);
            ``False`` — none (and undoes earlier kernel patches); or an iterable of names from ``ALL_KERNELS``
            (the only way to turn on the approximate ``"regelu2"`` / ``"resilu2"``).
        disable: kernel names to leave off.
    """
    names = _resolve(model, enable, disable)
    state = state_of(model)
    if names or (state is not None and state.kernels):
        configure(model, kernels=tuple(names))
    return {name: len(_covered(model, name)) for name in names}


def restore(model: nn.Module) -> int:
    """Switch every kernel off again (memory options stay); returns how many modules the kernels covered."""
    state = state_of(model)
    if state is None or not state.kernels:
        return 0
    covered = {i for name in state.kernels for i in _covered(model, name)}
    configure(model, kernels=())
    return len(covered)


def patched_modules(model: nn.Module) -> dict[str, str]:
    """``{qualified module name: kernel name}`` of the modules the kernels currently cover."""
    state = state_of(model)
    if state is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {names[i]: name for name in state.kernels for i in _covered(model, name) if i in names}
