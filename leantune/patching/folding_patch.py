"""The folded MS norm: the norm's affine moves into the linears after it, which then read the saved output ŷ.

A norm computes ``u = γ ⊙ ŷ + β`` and a consumer linear ``W u + b = (W diag γ) ŷ + (W β + b)``: the base weights
are rewritten to ``W' = W diag γ``, ``b' = W β + b`` (:mod:`.folding`), the norm returns ŷ (saved by
the norm *and* the consumer as one storage) and the consumer's adapters are compensated so that every layer
computes exactly what it computed on ``u`` (in the adapter's own parameterisation, which is what gets saved):

* peft LoRA: each LoRA-A reads ŷ through ``A diag γ`` (its forward is rebound; ``A`` itself is unchanged), and a
  forward hook adds the constant ``s · B (A β)`` (weights only: nothing more is saved);
* leantune low-rank layers: ``set_input_affine(γ, β)`` — the layer applies ``diag γ`` to its input-side factor and
  adds ``B_eff (A_eff β)`` itself (:class:`leantune.adapters.low_rank.LowRankLayer`).

So checkpoints written while folded (Trainer's ``save_pretrained``) load on the original base model. Merging is
refused while folded (undo first). Norms are left as they are, with the reason in the report, when folding could
not keep the function: a trainable norm or consumer, a quantized consumer, merged adapters, an adapter type that
cannot absorb the affine (LoRA variants such as DoRA, bottleneck adapters), or LoRA dropout on a norm with β ≠ 0.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from leantune.kernels.lora_linear import scaled_input_linear
from leantune.kernels.norms import ms_norm, ms_norm_affine

from .folding import GAMMA_TOLERANCE, base_layer, fold_into_linear, is_conv1d, norm_affine, norm_eps, unfold_linear
from .ops_patch import norm_display_name
from .sites import is_lowrank_adapter
from .state import foreign_forward, rebind


def _tied(model: nn.Module, weight: torch.Tensor) -> bool:
    # storage identity, not data_ptr: every meta tensor (leantune plan) has data_ptr 0
    key = weight.untyped_storage()._cdata
    return sum(p.untyped_storage()._cdata == key for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _adapter_reason(name: str, consumer: nn.Module, beta_nonzero: bool) -> str:
    """Why the adapters on ``consumer`` cannot absorb a folded affine ('' if they can)."""
    if is_lowrank_adapter(consumer):
        return ""
    if isinstance(consumer, LoraLayer):
        if type(consumer).__name__ != "Linear" or getattr(consumer, "lora_variant", {}) or any(
                consumer.use_dora.values()):
            return f"consumer {name} has a LoRA variant (e.g. DoRA) that cannot absorb the folded affine"
        for adapter, dropout in consumer.lora_dropout.items():
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and beta_nonzero:
                return (f"consumer {name} (adapter {adapter!r}) has lora_dropout={dropout.p} and the norm has a bias β: "
                        "dropout would have to mask β per token too")
        return ""
    if isinstance(consumer, BaseTunerLayer):
        return f"consumer {name} carries a {type(consumer).__name__} adapter, which cannot absorb the folded affine"
    return ""


def fold_check(state, site) -> str:
    """Why ``site`` cannot be folded ('' if it can)."""
    config, norm = state.memory, site.norm
    if isinstance(norm, ModulesToSaveWrapper):
        return "norm is trained with the adapter (modules_to_save); left unchanged"
    if foreign_forward(norm):
        return "forward already replaced by someone else; left unchanged"
    if getattr(norm, "weight", None) is None:
        return "norm has no affine weight; left unchanged"
    if norm.weight.requires_grad or (getattr(norm, "bias", None) is not None and norm.bias.requires_grad):
        return "norm is trainable, cannot fold its affine; left unchanged"
    gamma, beta = norm_affine(norm, site.kind)
    # On the meta device (leantune plan) values are unknown: assume γ invertible and β possibly nonzero.
    if not gamma.is_meta and bool((gamma.abs() < GAMMA_TOLERANCE).any()):
        return f"some |γ| < {GAMMA_TOLERANCE}; folding would not be invertible; skipped"
    if site.is_final and not config.fold_final_norm:
        return "final norm not folded (fold_final_norm=False)"
    beta_nonzero = beta is not None and (beta.is_meta or bool(beta.any()))
    for cname, consumer in site.consumers:
        layer = base_layer(consumer)
        if not (type(layer) is nn.Linear or is_conv1d(layer)):
            return (f"consumer {cname} is {type(layer).__name__} (not nn.Linear/Conv1D, e.g. quantized); norm left "
                    "unchanged")
        if layer.weight.requires_grad:
            return f"consumer {cname} has a trainable base weight; folding would change what is trained; norm left unchanged"
        if getattr(consumer, "merged", False):
            return f"consumer {cname} has merged adapters; norm left unchanged"
        if _tied(state.model, layer.weight) and not config.untie_embeddings:
            return (f"{cname} shares its weight with the embeddings (tied); final norm not folded "
                    "(MemoryConfig(untie_embeddings=True) unties it)")
        reason = _adapter_reason(cname, consumer, beta_nonzero)
        if reason:
            return reason + "; norm left unchanged"
    return ""


def _scaled_lora_a(gamma: torch.Tensor):
    """LoRA-A forward reading ŷ: ``x (A diag γ)ᵀ``, the product formed from the weight at each call (one rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_input_linear(x, self.weight, gamma, self.bias)

    return forward


def _lora_beta_hook(beta: torch.Tensor):
    """Forward hook adding ``Σ_active s · B (A β)`` to a peft LoRA layer's output."""

    def hook(module, args, kwargs, output):
        if module.disable_adapters or module.merged:
            return None
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("leantune.memory: mixed-adapter batches (adapter_names=) are not supported on "
                                      "a folded norm's consumer; undo leantune.memory first")
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            # on a [1, in] row, not a vector: F.linear of a vector squeezes its matmul's output in place, which
            # selective checkpointing (a cache of matmul outputs) rejects as a mutation
            row = beta.to(device=a.device, dtype=a.dtype)[None]
            shift = F.linear(F.linear(row, a), b)[0] * module.scaling[adapter]
            output = output + shift.to(output.dtype)
        return output

    return hook


def _refuse_merge(name: str):
    def merge(*args, **kwargs):
        raise RuntimeError(f"leantune.memory: the norm before {name} is folded into it; call "
                           "leantune.memory.restore(model) (or handle.undo()) before merging adapters")

    return merge


def _compensate(state, applied, cname: str, consumer: nn.Module, gamma: torch.Tensor, beta: torch.Tensor | None):
    """Keep the consumer's adapters computing what they computed on u = γ ⊙ ŷ + β (module docstring)."""
    if is_lowrank_adapter(consumer):
        consumer.set_input_affine(gamma, beta)
        applied.undo.append(consumer.clear_input_affine)
    elif isinstance(consumer, LoraLayer):
        consumer.__dict__["_leantune_input_affine"] = (gamma, beta)  # read by the fused ops (kernels.fused_mlp)
        applied.undo.append(lambda: consumer.__dict__.pop("_leantune_input_affine", None))
        for adapter, lora_a in consumer.lora_A.items():
            rebind(applied, lora_a, _scaled_lora_a(gamma), "GammaScaledLinear",
                   f"{lora_a.in_features}, {lora_a.out_features}, input scaled by the folded norm's γ", state=state)
            dropout = consumer.lora_dropout[adapter]
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                state.warn_once(cname, "dropout", f"leantune.memory: {cname} (adapter {adapter!r}) has "
                                f"lora_dropout={dropout.p}: LoRA-A saves the dropout output, so the norm's output is "
                                "not shared there (results stay exact, the memory saving shrinks)")
        if beta is not None:
            handle = consumer.register_forward_hook(_lora_beta_hook(beta), with_kwargs=True)
            applied.undo.append(handle.remove)
    else:
        return
    consumer.merge = _refuse_merge(cname)
    applied.undo.append(lambda: consumer.__dict__.pop("merge", None))


def _live_affine(applied, norm: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """γ and β as the adapters read them at run time: the norm's own (frozen) parameters — state the model holds
    anyway, so nothing new is kept or saved — or, for Gemma's ``1 + w``, a buffer registered on the norm."""
    gamma = norm.weight.detach()
    if kind == "gemma":
        norm.register_buffer("leantune_gamma", 1.0 + gamma, persistent=False)
        applied.undo.append(lambda: norm._buffers.pop("leantune_gamma", None))
        gamma = norm.leantune_gamma
    beta = getattr(norm, "bias", None)
    keep_beta = beta is not None and (beta.is_meta or bool(beta.detach().any()))  # meta: values unknown, keep
    return gamma, (beta.detach() if keep_beta else None)


def patch_norm_folded(state, applied, site) -> bool:
    config, norm = state.memory, site.norm
    gamma, beta = norm_affine(norm, site.kind)
    for cname, consumer in site.consumers:
        layer = base_layer(consumer)
        if _tied(state.model, layer.weight):  # fold_check allowed it: untie_embeddings=True
            tied_weight = layer.weight
            layer.weight = nn.Parameter(tied_weight.detach().clone(), requires_grad=False)
            applied.undo.append(lambda layer=layer, w=tied_weight: setattr(layer, "weight", w))
            state.note(f"{site.name}: untied {cname} from the input embeddings to fold the final norm")
    live_gamma, live_beta = _live_affine(applied, norm, site.kind)
    for cname, consumer in site.consumers:
        record = fold_into_linear(cname, consumer, gamma, beta, config.keep_original_weights)
        applied.records.append((consumer, record))
        applied.undo.append(lambda c=consumer, r=record: unfold_linear(c, r))
        _compensate(state, applied, cname, consumer, live_gamma, live_beta)

    eps, kind, post_norm, name = norm_eps(norm), site.op_kind, site.post_norm, site.name
    last = {"public": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type) and torch.is_grad_enabled():
            state.warn_once(name, "autocast", f"leantune.memory: autocast is on around {name}: the next linear "
                            "saves its cast copy, so the norm output is not shared (consider running the model "
                            "in the autocast dtype instead)")
        if post_norm:  # BERT: the residual still needs γ ⊙ ŷ + β (frozen γ, β: nothing saved for it)
            y, out = ms_norm_affine(x, eps, kind, self.weight, self.bias)
            out._leantune_normalized = y  # strong ref: ŷ lives as long as the tensor the consumers will receive
        else:
            y = out = ms_norm(x, eps, kind)
        last["public"] = weakref.ref(out)
        return out

    consumer_names = ", ".join(c.rsplit(".", 1)[-1] for c, _ in site.consumers)
    rebind(applied, norm, forward, norm_display_name(kind),
           f"eps={eps}, affine folded into {consumer_names}" + (" (post-norm: γ ⊙ ŷ + β also returned)"
                                                                  if post_norm else ""), state=state)

    def pre_hook(module: nn.Module, args: tuple):
        x = args[0]
        public = last["public"]() if last["public"] is not None else None
        same = x is public or (not post_norm and public is not None
                                and x.untyped_storage().data_ptr() == public.untyped_storage().data_ptr())
        if not same:  # pre-norm: a view of ŷ (e.g. lm_head on the last positions) is still ŷ
            raise RuntimeError(
                f"leantune.memory: {getattr(module, '_leantune_name', type(module).__name__)} holds the folded affine "
                f"of {name} but received a tensor that did not come from that norm (reentrant gradient checkpointing "
                "detaches layer inputs; DeepSpeed ZeRO-3's module hooks pass other tensors on). Use "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), or "
                "MemoryConfig(ms_norms=False) (under ZeRO-3).")
        y = x._leantune_normalized if post_norm else x
        for adapter, lora_a in getattr(module, "lora_A", {}).items():
            if lora_a.weight.dtype != y.dtype and torch.is_grad_enabled():
                state.warn_once(name, "dtype", f"leantune.memory: adapter {adapter!r} after {name} is "
                                f"{lora_a.weight.dtype} but the activations are {y.dtype}: peft casts a copy, so the "
                                "norm output is not shared (load adapters in the model dtype, e.g. "
                                "get_peft_model(..., autocast_adapter_dtype=False))")
        return None if y is x else (y, *args[1:])

    for cname, consumer in site.consumers:
        consumer._leantune_name = cname
        hook = consumer.register_forward_pre_hook(pre_hook)
        applied.undo.append(hook.remove)
        applied.undo.append(lambda c=consumer: c.__dict__.pop("_leantune_name", None))
    return True
