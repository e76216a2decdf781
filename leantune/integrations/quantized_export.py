"""``leantune export --to quantized``: an L4Q adapter's served integer model as a transformers folder.

L4Q trains ``Ŵ = (q − z)·s`` (:mod:`leantune.kernels.l4q`). The folder stores, for every L4Q-adapted linear, the codes
``q`` (int8 holding ``bits``-bit values), the step ``s`` and the float zero point ``z`` per group of ``g`` inputs in
torchao's ``IntxUnpackedToInt8Tensor`` layout, with a ``TorchAoConfig(IntxWeightOnlyConfig(int<bits>, PerGroup(g),
ASYMMETRIC, UNPACKED_TO_INT8))`` in ``config.json``; every other weight stays as it was (listed in
``modules_to_not_convert``). ``AutoModelFor….from_pretrained(folder)`` (transformers ≥ 5 with torchao ≥ 0.15) loads it
on CPU or GPU, and its ``dequantize`` computes ``(q − z)·s`` in the model dtype in the same order as training did, so
the served logits equal the training-time forward bit for bit.

The tensors are built from ``(q, s, z)`` directly: torchao's own quantize path with a float zero point adds ``z``
before the cast to int8 and would round differently.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from packaging.version import Version

from leantune._io import atomic_output_dir
from leantune._utils import LeanTuneError
from leantune.adapters.l4q import L4QLayer
from leantune.integrations.interop import copy_tokenizer_files, load_adapted_model

MIN_TORCHAO = Version("0.15.0")  # what transformers 5.x's torchao quantizer requires to load the folder


def torchao_version() -> Version | None:
    """The installed torchao's version, None when it is not installed."""
    if importlib.util.find_spec("torchao") is None:
        return None
    from importlib.metadata import version  # local: only needed when torchao is there

    return Version(version("torchao"))


def _require_torchao() -> None:
    found = torchao_version()
    if found is None or found < MIN_TORCHAO:
        have = "is not installed" if found is None else f"{found} is installed"
        raise LeanTuneError(f"export --to quantized writes torchao's int layout, which needs torchao>={MIN_TORCHAO} "
                            f"(to write and to load it); torchao {have}: pip install 'torchao>={MIN_TORCHAO}'")


def _l4q_layers(model: torch.nn.Module) -> dict[str, L4QLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, L4QLayer)}


def quantized_state(model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple]:
    """``{module name (without peft's prefix): (q, s, z, bits, group)}`` of every L4Q layer; refuses a model whose
    layers cannot share one torchao config or layout."""
    layers = _l4q_layers(model)
    if not layers:
        raise LeanTuneError("export --to quantized needs an L4Q adapter (its quantizer is what gets served); for other "
                            "adapters use `leantune merge` and quantize the merged model")
    out = {}
    for name, layer in layers.items():
        if layer.is_conv1d:
            raise LeanTuneError(f"{name} is a GPT-2 style Conv1D; torchao's int layout is for nn.Linear weights "
                                "(export the merged model with `leantune merge` instead)")
        if adapter not in layer.r:
            raise LeanTuneError(f"{name} has no L4Q adapter named {adapter!r}")
        _, q, s, z = layer.quantized(adapter)
        out[name.split("base_model.model.", 1)[-1]] = (q, s, z, layer.bits[adapter], layer.in_features // s.shape[1])
    kinds = {(bits, group) for *_, bits, group in out.values()}
    if len(kinds) > 1:
        raise LeanTuneError(f"the L4Q layers use several (bits, group size) settings {sorted(kinds)}; one torchao "
                            "config describes one, so export them as separate adapters or retrain with one setting")
    return out


def to_quantized_model(model: torch.nn.Module, adapter: str = "default") -> torch.nn.Module:
    """The base model of ``model`` (a PeftModel with an L4Q adapter) with each L4Q linear's weight replaced by its
    torchao integer tensor and the quantization config attached (ready for ``save_pretrained``)."""
    _require_torchao()
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup  # local: optional dependency
    from torchao.quantization.quantize_.workflows.intx.intx_packing_format import IntxPackingFormat  # local: same
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (  # local: same
        IntxUnpackedToInt8Tensor,
    )
    from transformers import TorchAoConfig  # local: imports torchao's config classes
    from transformers.quantizers import AutoHfQuantizer  # local: same

    state = quantized_state(model, adapter)
    (bits, group), = {(b, g) for *_, b, g in state.values()}
    base = model.unload()  # the original weights: the integer tensors replace them below
    linears = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    code_dtype = getattr(torch, f"int{bits}")  # torch.int1 … torch.int7, torch.int8
    for name, (q, scale, zero, _, _) in state.items():
        linear = base.get_submodule(name)
        weight = IntxUnpackedToInt8Tensor(qdata=q, scale=scale, zero_point=zero, target_dtype=code_dtype,
                                          block_size=(1, group), dtype=scale.dtype, activation_quantization=None)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    config = TorchAoConfig(
        IntxWeightOnlyConfig(weight_dtype=code_dtype, granularity=PerGroup(group),
                             mapping_type=MappingType.ASYMMETRIC,
                             intx_packing_format=IntxPackingFormat.UNPACKED_TO_INT8),
        modules_to_not_convert=[n for n in linears if n not in state],
    )
    base.config.quantization_config = config
    base.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    return base


def export_quantized(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Write the served integer model of an L4Q adapter on ``base_dir`` into ``out_dir`` (module docstring)."""
    _require_torchao()
    model = load_adapted_model(base_dir, adapter_dir)
    quantized = to_quantized_model(model)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        quantized.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(Path(base_dir), tmp)
    return Path(out_dir)
