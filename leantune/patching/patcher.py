"""One patcher for ``leantune.memory`` (what is saved) and ``leantune.kernels`` (how it is computed).

The state of a model — which memory options and which kernels are on — lives in one :class:`PatchState` on the
model. :func:`configure` turns options on or off; for every site (:mod:`.sites`) it works out which patch the
options ask for, and only where that differs from what is applied it undoes the old patch (last in, first out) and
applies the new one. So memory-then-kernels, kernels-then-memory and both at once give the same model.

Per site, the patch that wins:

==============  =========================================================  =====================================
site            patch (memory option / kernel name)                        note
==============  =========================================================  =====================================
norm            folded MS norm (``ms_norms``) > unfolded MS norm            folded = affine moved into consumers
                (``ms_rmsnorm`` / ``ms_layernorm``)
activation      2-bit ReGELU2/ReSiLU2 (``approx_activations``,              none inside a fused gated MLP
                ``regelu2`` / ``resilu2``)
gated MLP       fused MLP saving x, e, g (``fused_gated_mlp``, ``gated_mlp``)
adapter linear  fused adapter linear (``lora_linear``, ``lowrank_linear``)  per call it runs the layer's own
                                                                           forward when it cannot fuse
LoRA-A input    VeLoRA (``velora``)                                         the fused linear then steps aside
causal LM       chunked LM-head loss (``chunked_loss``)                     training with labels only
decoder layers  activation budget: per layer keep / selective recompute /   training with gradients only
                checkpoint / offload (``budget``, ``layer_modes``)
==============  =========================================================  =====================================

Every patch is per instance: ``forward`` rebound (and ``_get_name`` set, so ``print(model)`` shows e.g.
``MSRMSNorm``), hooks registered, folded weights rewritten (originals kept on CPU). The ops themselves pick their
backend (Triton on CUDA, C or torch on CPU) through :mod:`leantune.kernels.dispatch`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from leantune.architectures import hf_model

from .budget import patch_budget
from .folding_patch import fold_check, patch_norm_folded
from .loss_patch import patch_chunked_loss
from .ops_patch import patch_activation, patch_adapter_linear, patch_gated_mlp, patch_norm_unfolded, patch_velora
from .options import ALL_KERNELS
from .sites import Sites, find_sites
from .state import Applied, PatchState, state_of

UNCHANGED: Any = object()
KERNEL_NAMES = ALL_KERNELS


def _choices(sites: Sites, memory, kernels: tuple[str, ...]) -> list[tuple[str, Any, Any, list[str]]]:
    """``(site type, key module, site, ordered acceptable patch kinds)`` for every site, in application order."""
    out: list[tuple[str, Any, Any, list[str]]] = []
    on = set(kernels)
    fused_mlps = set()
    for site in sites.gated_mlps:
        wanted = (memory is not None and memory.fused_gated_mlp) or "gated_mlp" in on
        if wanted:
            fused_mlps.add(id(site.mlp))
        out.append(("mlp", site.mlp, site, ["fused"] if wanted else []))
    inside_fused = {id(s.act) for s in sites.gated_mlps if id(s.mlp) in fused_mlps}
    for site in sites.activations:
        kernel = "resilu2" if site.kind == "silu" else "regelu2"
        wanted = ((memory is not None and memory.approx_activations) or kernel in on) and id(site.module) not in \
            inside_fused  # the fused MLP recomputes its activation exactly and saves nothing for it
        out.append(("activation", site.module, site, ["approx"] if wanted else []))
    for site in sites.norms:
        options = ["folded"] if memory is not None and memory.ms_norms and site.consumers else []
        if f"ms_{site.op_kind}" in on and site.kind != "gemma":
            options.append("unfolded")
        out.append(("norm", site.norm, site, options))
    for name, module in sites.adapter_linears:
        lowrank = not hasattr(module, "lora_A")
        wanted = ("lowrank_linear" if lowrank else "lora_linear") in on
        out.append(("adapter", module, (name, module), ["fused"] if wanted else []))
    if sites.causal_lm is not None:
        wanted = memory is not None and memory.chunked_loss
        out.append(("loss", sites.causal_lm, sites.causal_lm, ["chunked"] if wanted else []))
    if sites.layer_stack is not None:
        wanted = memory is not None and (memory.budget is not None or memory.layer_modes is not None)
        out.append(("layers", sites.layer_stack, sites.layer_stack, ["budget"] if wanted else []))
    down_of_fused = {id(site.mlp.down_proj) for site in sites.gated_mlps if id(site.mlp) in fused_mlps}
    for role, modules in sites.velora.items():
        wanted = memory is not None and memory.velora and role in memory.velora_targets
        for name, module in modules:
            skip = id(module) in down_of_fused  # the fused gated MLP recomputes this input instead of saving it
            out.append(("velora", module, (name, module), ["velora"] if wanted and not skip else []))
    return out


_PATCHERS = {
    ("norm", "folded"): patch_norm_folded,
    ("norm", "unfolded"): patch_norm_unfolded,
    ("activation", "approx"): patch_activation,
    ("mlp", "fused"): patch_gated_mlp,
    ("adapter", "fused"): patch_adapter_linear,
    ("velora", "velora"): patch_velora,
    ("loss", "chunked"): patch_chunked_loss,
    ("layers", "budget"): patch_budget,
}


def _undo(applied: Applied) -> None:
    for fn in reversed(applied.undo):
        fn()
    applied.undo.clear()
    applied.records.clear()


def configure(model: nn.Module, memory: Any = UNCHANGED, kernels: Any = UNCHANGED) -> PatchState:
    """Set the memory options (a ``MemoryConfig`` or None) and/or the kernel names of ``model`` and patch it so."""
    state = state_of(model, create=True)
    if memory is not UNCHANGED:
        state.memory = memory
        state.report.clear()
    if kernels is not UNCHANGED:
        unknown = [k for k in kernels if k not in KERNEL_NAMES]
        if unknown:
            raise ValueError(f"unknown kernel name(s) {unknown}; known: {list(KERNEL_NAMES)}")
        state.kernels = tuple(kernels)
    sites = find_sites(model)
    for line in sites.notes if state.memory is not None else ():
        state.note(line)
    plan = _choices(sites, state.memory, state.kernels)
    live = {(site_type, id(module)) for site_type, module, _, _ in plan}
    for key in [k for k in state.applied if k not in live]:  # sites that disappeared (e.g. adapters deleted)
        _undo(state.applied.pop(key))
    changed = []
    for site_type, module, site, options in plan:
        key = (site_type, id(module))
        current = state.applied.get(key)
        if current is not None and _still_good(current, options):
            current.site = site
            continue
        changed.append((key, site_type, site, options))
    for key, *_ in reversed(changed):  # undo in reverse, so e.g. tied weights come back in order
        if key in state.applied:
            _undo(state.applied.pop(key))
    for key, site_type, site, options in changed:
        state.applied[key] = _apply_first(state, site_type, site, options)
    if state.memory is None and not state.kernels:
        hf_model(model).__dict__.pop("_leantune_patches", None)
    return state


def _still_good(current: Applied, options: list[str]) -> bool:
    """The applied patch is what the options ask for (or the best of them that could be applied)."""
    if current.kind is None:
        return not options or list(current.declined) == options
    return current.kind in options and list(current.declined) == options[:options.index(current.kind)]


def _apply_first(state: PatchState, site_type: str, site: Any, options: list[str]) -> Applied:
    declined: list[str] = []
    for kind in options:
        applied = Applied(kind, site, tuple(declined))
        if site_type == "norm" and kind == "folded":
            reason = fold_check(state, site)
            if reason:
                state.note(f"{site.name}: {reason}")
                declined.append(kind)
                continue
        try:
            ok = _PATCHERS[(site_type, kind)](state, applied, site)
        except BaseException:
            _undo(applied)
            raise
        if ok:
            return applied
        _undo(applied)
        declined.append(kind)
    return Applied(None, site, tuple(declined))


def restore_all(model: nn.Module) -> None:
    """Undo every leantune patch of ``model`` (memory options and kernels)."""
    configure(model, memory=None, kernels=())


def describe(model: nn.Module) -> dict[str, str]:
    """``{module name: patches}`` of every patched module, e.g. ``{"model.layers.0.input_layernorm": "norm:folded"}``
    (a LoRA layer can carry two: ``"adapter:fused, velora:velora"``)."""
    state = state_of(model)
    if state is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, list[str]] = {}
    for (site_type, key), applied in state.applied.items():
        if applied.kind is not None:
            found.setdefault(names.get(key, "?"), []).append(f"{site_type}:{applied.kind}")
    return {name: ", ".join(sorted(kinds)) for name, kinds in sorted(found.items())}
