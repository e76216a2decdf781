"""FSDP2 for adapted models: shard the way leantune's adapters and optimizers are tested, or say why not first.

``shard_model(model)`` = ``fully_shard`` on every decoder layer, then on ``model`` itself as the root. The root
matters for a ``PeftModel``: tensors the tuner keeps outside the layers (Compacter's shared PHM rule) belong to
the root unit, so their gradients are averaged like every other; a trainable tensor left outside every unit would
train separately on each rank (leantune's optimizers refuse that too).

Refused before anything is sharded, naming the unit and the tensors: trainable parameters of different dtypes in
one unit, which FSDP2 rejects only at the first forward ("uniform original parameter dtype") — e.g. a bf16 model
whose adapter peft upcast to fp32 next to bf16 LayerNorms the adapter also trains (Compacter); and a
bitsandbytes 8-bit base, which FSDP2 cannot shard (:func:`refuse_8bit_bases`; a 4-bit base shards).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leantune.architectures import find_layer_stack


def _trainable_dtypes(module: nn.Module, exclude: set[int]) -> dict[torch.dtype, list[str]]:
    out: dict[torch.dtype, list[str]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in exclude:
            out.setdefault(p.dtype, []).append(name)
    return out


def refuse_8bit_bases(model: nn.Module) -> None:
    """Raise ``ValueError`` for a bitsandbytes 8-bit base (``Linear8bitLt``): it cannot be sharded by FSDP2.

    Its quantization (the int8 codes' row scales ``SCB``, and ``CB``) lives on the ``Int8Params`` object. FSDP2
    all-gathers the shards into a plain ``Parameter``, and ``Linear8bitLt.forward`` then fails reading
    ``weight.CB`` (measured: bitsandbytes 0.50, 2 gloo processes). A 4-bit base keeps its state on the module, where
    bitsandbytes puts it back (:func:`keep_quant_states`), so QLoRA shards. bitsandbytes' own 8-bit matmul also reads
    the codes from the module's state, so the 8-bit weights would stay whole on every rank even if the attribute were
    restored."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(weight, "SCB") and hasattr(weight, "CB"):
            raise ValueError(f"{name} has a bitsandbytes 8-bit weight (Linear8bitLt), which FSDP2 cannot shard: its "
                             "quantization state lives on the Int8Params object that FSDP2 replaces by a plain "
                             "Parameter (the forward fails on weight.CB). Quantize the base to 4 bits for FSDP2 "
                             "(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=<the model's dtype>)), or "
                             "train the 8-bit base under DDP or on one process.")


def check_fsdp2_units(model: nn.Module, layers: nn.ModuleList | None = None) -> None:
    """Raise ``ValueError`` if a unit of :func:`shard_model` would hold trainable parameters of several dtypes, or
    the model has an 8-bit base (:func:`refuse_8bit_bases`)."""
    refuse_8bit_bases(model)
    if layers is None:
        try:
            layers = find_layer_stack(model)
        except ValueError:  # no known decoder stack: the model is one unit
            layers = nn.ModuleList()
    in_layers: set[int] = set()
    units = []
    for i, layer in enumerate(layers):
        units.append((f"decoder layer {i}", _trainable_dtypes(layer, set())))
        in_layers |= {id(p) for p in layer.parameters()}
    units.append(("the root (everything outside the decoder layers)", _trainable_dtypes(model, in_layers)))
    for unit, dtypes in units:
        if len(dtypes) > 1:
            listing = "; ".join(f"{str(d).replace('torch.', '')}: {', '.join(names[:3])}"
                                + (f" (+{len(names) - 3})" if len(names) > 3 else "") for d, names in dtypes.items())
            raise ValueError(
                f"FSDP2 needs one dtype for the trainable parameters of a shard unit, and {unit} has several "
                f"({listing}). Keep the adapter in the model's dtype (get_peft_model(..., "
                "autocast_adapter_dtype=False)), or load the model in float32 and compute in bf16 with "
                "fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)).")


def keep_quant_states(model: nn.Module, mp_policy: Any = None) -> int:
    """Let bitsandbytes 4-bit weights survive FSDP2 (QLoRA); returns how many were found.

    FSDP2 shards a ``Params4bit`` by rows of its packed codes and, after the all-gather, hands the module a plain
    parameter: the ``quant_state`` (absmax, code book) that lived on the ``Params4bit`` object is gone, and the
    forward fails with "quant_state is required" — unless the module holds it too (``module.quant_state``), from
    where bitsandbytes puts it back. ``Linear4bit`` records it there only when its ``Params4bit`` was created with the
    module; weights loaded otherwise (e.g. prequantized checkpoints) lack it, so it is set here before sharding. The
    state itself stays whole on every rank (``leantune plan`` counts it so). A ``mp_policy`` casting parameters to
    another dtype than the codes' storage would cast the packed codes as numbers: refused."""
    found = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not hasattr(weight, "quant_storage"):
            continue
        found += 1
        if getattr(module, "quant_state", None) is None:
            module.quant_state = state
        cast = getattr(mp_policy, "param_dtype", None)
        if cast is not None and cast != weight.dtype:
            raise ValueError(f"{name}: its 4-bit codes are stored as {weight.dtype} and mp_policy casts parameters "
                             f"to {cast}, which would turn the packed codes into other numbers. Quantize with "
                             f"quant_storage={cast} (BitsAndBytesConfig(bnb_4bit_quant_storage=...)) or drop "
                             "param_dtype from the policy.")
    return found


def shard_model(model: nn.Module, layers_attribute: str | None = None, **fully_shard_kwargs: Any) -> nn.Module:
    """``fully_shard`` every decoder layer, then ``model`` as the root (module docstring); returns ``model``.

    ``fully_shard_kwargs`` go to every call (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...). Inject
    adapters and apply ``leantune.memory`` / ``leantune.kernels`` before, build the optimizer after."""
    from torch.distributed.fsdp import fully_shard

    layers = find_layer_stack(model, layers_attribute)
    check_fsdp2_units(model, layers)  # FSDP2 compares the parameters' own dtypes, whatever mp_policy says
    keep_quant_states(model, fully_shard_kwargs.get("mp_policy"))
    for layer in layers:
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


__all__ = ["check_fsdp2_units", "keep_quant_states", "refuse_8bit_bases", "shard_model"]
