"""``apply(model, config)`` / ``restore(model)``: patch a built (optionally peft-wrapped) HF model in place.

Everything is per-instance and reversible: activations are swapped for :class:`ApproxActivation` wrappers,
MLP/norm/LoRA-A ``forward`` methods are rebound on the instance (``module.__dict__["forward"]``), folded linears get
a forward pre-hook and their weights are rewritten (originals kept on CPU). ``handle.undo()`` reverts all of it.
"""

from __future__ import annotations

import math
import types
import warnings
import weakref
from typing import Callable

import torch
from torch import nn

from .approx_activations import ApproxActivation
from .architectures import SUPPORTED_MODEL_TYPES, ActivationSite, GatedMLPSite, NormSite, activation_kind, describe, hf_model
from .config import MemoryConfig
from .folding import GAMMA_TOLERANCE, FoldRecord, base_layer, fold_into_linear, is_conv1d, norm_affine, norm_eps, unfold_linear
from .gated_mlp import fused_gated_mlp, unsupported_reason
from .ms_norms import ms_norm_affine, normalize
from .velora import VeLoRAProjection

_KERNEL_ACTIVATION = {("silu", "none"): "silu", ("gelu", "none"): "gelu", ("gelu", "tanh"): "gelu_tanh"}


class SharingWarning(UserWarning):
    """Memory sharing between a norm and the linear after it cannot hold (the saving is lost, results stay right)."""


class MemoryHandle:
    """What :func:`apply` changed. ``undo()`` restores the model; ``report`` lists what was patched or skipped."""

    def __init__(self, model: nn.Module, config: MemoryConfig):
        self.model, self.config = model, config
        self.report: list[str] = []
        self.fold_records: list[tuple[nn.Module, FoldRecord]] = []
        self.counts: dict[str, int] = {"ms_norms": 0, "approx_activations": 0, "fused_gated_mlp": 0, "velora": 0}
        self._undo: list[Callable[[], None]] = []
        self._warned: set[tuple[str, str]] = set()
        self.active = True

    def warn_once(self, key: str, reason: str, message: str) -> None:
        if (key, reason) not in self._warned:
            self._warned.add((key, reason))
            warnings.warn(message, SharingWarning, stacklevel=3)

    def undo(self) -> None:
        """Revert every change (weights restored bit-exactly when ``keep_original_weights``)."""
        if not self.active:
            return
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()
        self.fold_records.clear()
        target = hf_model(self.model)
        if getattr(target, "_leantune_memory_handle", None) is self:
            del target._leantune_memory_handle
        self.active = False

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return "leantune.memory: " + counts + "".join(f"\n  - {line}" for line in self.report)


def _rebind_forward(handle: MemoryHandle, module: nn.Module, fn: Callable) -> None:
    module.forward = types.MethodType(fn, module)
    handle._undo.append(lambda: module.__dict__.pop("forward", None))


def _tied(model: nn.Module, weight: torch.Tensor) -> bool:
    ptr = weight.untyped_storage().data_ptr()
    return sum(p.untyped_storage().data_ptr() == ptr for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _patch_norm(handle: MemoryHandle, site: NormSite) -> None:
    model, config = handle.model, handle.config
    norm = site.norm
    if "forward" in norm.__dict__:
        handle.report.append(f"{site.name}: forward already replaced by someone else; left unchanged")
        return
    if getattr(norm, "weight", None) is None:
        handle.report.append(f"{site.name}: norm has no affine weight; left unchanged")
        return
    if norm.weight.requires_grad or (getattr(norm, "bias", None) is not None and norm.bias.requires_grad):
        handle.report.append(f"{site.name}: norm is trainable, cannot fold its affine; left unchanged")
        return
    gamma, beta = norm_affine(norm, site.kind)
    if bool((gamma.abs() < GAMMA_TOLERANCE).any()):
        handle.report.append(f"{site.name}: some |γ| < {GAMMA_TOLERANCE}; folding would not be invertible; skipped")
        return
    if site.is_final and not config.fold_final_norm:
        handle.report.append(f"{site.name}: final norm not folded (fold_final_norm=False)")
        return
    for cname, consumer in site.consumers:
        layer = base_layer(consumer)
        if not (type(layer) is nn.Linear or is_conv1d(layer)):
            handle.report.append(f"{site.name}: consumer {cname} is {type(layer).__name__} (not nn.Linear/Conv1D, "
                                 "e.g. quantized); norm left unchanged")
            return
        if layer.weight.requires_grad:
            handle.report.append(f"{site.name}: consumer {cname} has a trainable base weight; folding would change "
                                 "what is trained; norm left unchanged")
            return
        if getattr(consumer, "merged", False):
            handle.report.append(f"{site.name}: consumer {cname} has merged adapters; norm left unchanged")
            return
        if _tied(model, layer.weight):
            if not config.untie_embeddings:
                handle.report.append(f"{site.name}: {cname} shares its weight with the embeddings (tied); final norm "
                                     "not folded (MemoryConfig(untie_embeddings=True) unties it)")
                return
            tied_weight = layer.weight
            layer.weight = nn.Parameter(tied_weight.detach().clone(), requires_grad=False)
            handle._undo.append(lambda layer=layer, w=tied_weight: setattr(layer, "weight", w))
            handle.report.append(f"{site.name}: untied {cname} from the input embeddings to fold the final norm")
    for cname, consumer in site.consumers:
        dropout = getattr(consumer, "lora_dropout", {})
        for adapter, module in dropout.items():
            if isinstance(module, nn.Dropout) and module.p > 0:
                handle.warn_once(cname, "dropout", f"leantune.memory: {cname} (adapter {adapter!r}) has "
                                 f"lora_dropout={module.p}: LoRA-A saves the dropout output, so {site.name}'s output "
                                 "is not shared there (results stay exact, the memory saving shrinks)")
    for cname, consumer in site.consumers:
        record = fold_into_linear(cname, consumer, gamma, beta, config.keep_original_weights)
        handle.fold_records.append((consumer, record))
        handle._undo.append(lambda c=consumer, r=record: unfold_linear(c, r))
        _refold_lora_a(handle, cname, consumer, gamma, beta)

    eps, kind, post_norm, name = norm_eps(norm), site.kind, site.post_norm, site.name
    last = {"public": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) and torch.is_grad_enabled():
            handle.warn_once(name, "autocast", f"leantune.memory: autocast is on around {name}: the next linear "
                             "saves its cast copy, so the norm output is not shared (consider running the model "
                             "in the autocast dtype instead)")
        if post_norm:  # BERT: the residual still needs γ ⊙ ŷ + β (frozen γ, β: nothing saved for it)
            y, out = ms_norm_affine(x, kind, eps, self.weight, self.bias)
            out._leantune_normalized = y  # strong ref: ŷ lives as long as the tensor the consumers will receive
        else:
            y = out = normalize(x, kind, eps)
        last["public"] = weakref.ref(out)
        return out

    _rebind_forward(handle, norm, forward)

    def pre_hook(module: nn.Module, args: tuple):
        x = args[0]
        public = last["public"]() if last["public"] is not None else None
        same = x is public or (not post_norm and public is not None
                                and x.untyped_storage().data_ptr() == public.untyped_storage().data_ptr())
        if not same:  # pre-norm: a view of ŷ (e.g. lm_head on the last positions) is still ŷ
            raise RuntimeError(
                f"leantune.memory: {getattr(module, '_leantune_name', type(module).__name__)} holds the folded affine "
                f"of {name} but received a tensor that did not come from that norm (reentrant gradient checkpointing "
                "detaches layer inputs). Use model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}) or MemoryConfig(ms_norms=False).")
        y = x._leantune_normalized if post_norm else x
        for adapter, lora_a in getattr(module, "lora_A", {}).items():
            if lora_a.weight.dtype != y.dtype and torch.is_grad_enabled():
                handle.warn_once(name, "dtype", f"leantune.memory: adapter {adapter!r} after {name} is "
                                 f"{lora_a.weight.dtype} but the activations are {y.dtype}: peft casts a copy, so the "
                                 "norm output is not shared (load adapters in the model dtype, e.g. "
                                 "get_peft_model(..., autocast_adapter_dtype=False))")
        return None if y is x else (y, *args[1:])

    for cname, consumer in site.consumers:
        consumer._leantune_name = cname
        hook = consumer.register_forward_pre_hook(pre_hook)
        handle._undo.append(hook.remove)
    handle.counts["ms_norms"] += 1


def _refold_lora_a(handle: MemoryHandle, name: str, consumer: nn.Module, gamma: torch.Tensor,
                   beta: torch.Tensor | None) -> None:
    """Keep existing LoRA branches unchanged in function: they now read ŷ instead of γ ⊙ ŷ + β, so A ← A diag(γ).

    (The constant ``s B A β`` of an already-trained adapter on a LayerNorm with β ≠ 0 cannot be kept: warned.)
    On undo, A ← A diag(1/γ) — bit-exactly the original A if it was not trained in between.
    """
    for adapter, lora_a in getattr(consumer, "lora_A", {}).items():
        weight = lora_a.weight
        original = weight.detach().clone()
        g = gamma.to(device=weight.device)
        with torch.no_grad():
            weight.copy_((weight.detach().to(torch.float64) * g[None, :]).to(weight.dtype))
        folded = weight.detach().clone()
        lora_b = consumer.lora_B[adapter].weight
        if beta is not None and bool(beta.any()) and bool(lora_b.detach().any()):
            handle.warn_once(name, "beta", f"leantune.memory: adapter {adapter!r} on {name} is already trained and "
                             "the norm before it has a bias β; its constant term s·B·A·β is dropped by folding")

        def undo(weight=weight, original=original, folded=folded, g=g):
            with torch.no_grad():
                if torch.equal(weight.detach(), folded):
                    weight.copy_(original)
                else:
                    weight.copy_((weight.detach().to(torch.float64) / g[None, :]).to(weight.dtype))

        handle._undo.append(undo)


def _patch_activation(handle: MemoryHandle, site: ActivationSite) -> None:
    act = getattr(site.parent, site.attr)
    if isinstance(act, ApproxActivation):
        return
    kind = activation_kind(act)
    if kind is None:
        handle.report.append(f"{site.name}: {type(act).__name__} has no 2-bit surrogate; left unchanged")
        return
    setattr(site.parent, site.attr, ApproxActivation(act, kind[0], kind[1]))
    handle._undo.append(lambda: setattr(site.parent, site.attr, act))
    handle.counts["approx_activations"] += 1


def _patch_gated_mlp(handle: MemoryHandle, site: GatedMLPSite) -> bool:
    mlp = site.mlp
    reason = unsupported_reason(*(getattr(mlp, a) for a in (site.gate, site.up, site.down)))
    if reason:
        handle.report.append(f"{site.name}: fused gated MLP not applied ({reason}); eager MLP kept")
        return False
    act = getattr(mlp, site.act)
    kind = activation_kind(act)
    kernel_activation = _KERNEL_ACTIVATION.get(kind) if kind is not None else None
    original_forward = mlp.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            act_fn = getattr(self, site.act)
            if isinstance(act_fn, ApproxActivation):
                act_fn = act_fn.original
            out = fused_gated_mlp(x, getattr(self, site.gate), getattr(self, site.up), getattr(self, site.down),
                                  act_fn, kernel_activation)
            if out is not None:
                return out
            why = unsupported_reason(*(getattr(self, a) for a in (site.gate, site.up, site.down)))
            handle.warn_once(site.name, "fused", f"leantune.memory: {site.name} runs eagerly ({why})")
        return original_forward(x)

    _rebind_forward(handle, mlp, forward)
    handle.counts["fused_gated_mlp"] += 1
    return True


def _patch_velora(handle: MemoryHandle, name: str, module: nn.Module) -> None:
    lora_a = getattr(module, "lora_A", None)
    if not lora_a:
        handle.report.append(f"{name}: no LoRA adapter, VeLoRA not applied")
        return
    for adapter, linear in lora_a.items():
        in_features = linear.weight.shape[1]
        groups = math.gcd(in_features, handle.config.velora_num_groups)
        projection = VeLoRAProjection(in_features, groups, handle.config.velora_scale).to(linear.weight.device)

        def forward(self, x, projection=projection):
            return projection.linear(x, self.weight)

        _rebind_forward(handle, linear, forward)
        handle.counts["velora"] += 1


def apply(model: nn.Module, config: MemoryConfig | None = None) -> MemoryHandle:
    """Patch ``model`` (a transformers model, optionally peft-wrapped) in place; returns a :class:`MemoryHandle`.

    Unknown architectures are left untouched (a warning names the supported families). Call after adapters are
    injected (the patched norms fold into the adapters' frozen base layers).
    """
    config = config or MemoryConfig()
    target = hf_model(model)
    if getattr(target, "_leantune_memory_handle", None) is not None:
        raise RuntimeError("leantune.memory.apply: this model is already patched; call leantune.memory.restore(model) "
                           "first")
    handle = MemoryHandle(model, config)
    layout = describe(model)
    if layout is None:
        message = (f"leantune.memory: model type {getattr(getattr(target, 'config', None), 'model_type', None)!r} "
                   f"({type(target).__name__}) is not supported; the model was left untouched. Supported: "
                   f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        warnings.warn(message, UserWarning, stacklevel=2)
        handle.report.append(message)
        handle.active = False
        return handle
    handle.report.extend(layout.notes)
    fused_mlps: set[int] = set()
    if config.fused_gated_mlp:
        for site in layout.gated_mlps:
            if _patch_gated_mlp(handle, site):
                fused_mlps.add(id(site.mlp))
    if config.approx_activations:
        for site in layout.activations:
            if id(site.parent) in fused_mlps:
                continue  # the fused MLP recomputes the activation exactly and saves nothing for it
            _patch_activation(handle, site)
    if config.ms_norms:
        for site in layout.norms:
            _patch_norm(handle, site)
    if config.velora:
        down_of_fused = {id(getattr(s.mlp, s.down)) for s in layout.gated_mlps if id(s.mlp) in fused_mlps}
        for role in config.velora_targets:
            for name, module in layout.velora.get(role, []):
                if id(module) in down_of_fused:
                    continue  # the fused gated MLP recomputes this input instead of saving it
                _patch_velora(handle, name, module)
    target._leantune_memory_handle = handle
    if config.verbose:
        print(handle)
    return handle


def restore(model: nn.Module) -> None:
    """Undo :func:`apply` on ``model`` (no-op if it was not patched)."""
    handle = getattr(hf_model(model), "_leantune_memory_handle", None)
    if handle is not None:
        handle.undo()
