"""leantune's patches survive transformers' hub-kernel re-kernelization (transformers 5.x with ``kernels``).

A model loaded with ``from_pretrained`` has ``use_kernels=True`` when the ``kernels`` package is installed (transformers
5.25 requires it), and every ``train()`` / ``eval()`` that changes the mode re-kernelizes it: for each layer class with
a hub kernel (``@use_kernel_forward_from_hub``: every RMSNorm) the instance ``forward`` is popped. Before the fix that
removed the folded MS-RMSNorm while its consumers kept ``W diag γ`` (γ applied twice, caught only by the consumer's
check). The tests run on a model with non-trivial γ, with and without hub kernels, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import leantune.kernels as K
import leantune.memory as lm

CONFIGS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _loaded(tmp_path, family: str, dtype: torch.dtype, use_kernels: bool):
    config_cls, model_cls = CONFIGS[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = model_cls(config)
    for module in model.modules():  # γ far from 1, so applying it twice would show
        if "RMSNorm" in type(module).__name__:
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    model.save_pretrained(tmp_path)
    loaded = model_cls.from_pretrained(tmp_path, dtype=dtype, use_kernels=use_kernels)
    assert loaded.use_kernels == use_kernels
    return loaded


def _has_kernels() -> bool:
    import importlib.util

    return importlib.util.find_spec("kernels") is not None


def _hub_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(type(m), "kernel_layer_name")]


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_patches_survive_train_eval_round_trips(tmp_path, family, dtype, use_kernels):
    if use_kernels:
        pytest.importorskip("kernels")
    model = _loaded(tmp_path, family, dtype, use_kernels)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
    ids = torch.randint(0, 64, (2, 8))
    model.eval()
    reference = model(input_ids=ids).logits.float()
    hub = _hub_layers(model)  # without the kernels package transformers' decorator marks nothing
    assert bool(hub) == _has_kernels(), "with kernels, the model has hub-kernel layers (the case under test)"
    lm.apply(model, lm.MemoryConfig.exact())
    K.apply(model, enable=True)
    patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert patched and all("forward" in m.__dict__ for m in hub if "RMSNorm" in type(m).__name__), \
        "leantune patched the norms (hub-kernel layers where kernels is installed)"
    for mode in ("train", "eval", "train", "eval"):
        getattr(model, mode)()
        assert all("forward" in m.__dict__ for m in patched), f"a patch vanished after {mode}()"
    out = model(input_ids=ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 0.1  # folded weights W diag γ round once more (bf16: 2^-8 relative)
    torch.testing.assert_close(out, reference, rtol=tol, atol=tol)
    # γ applied twice would be off by much more than rounding
    assert (out - reference).abs().max() < 0.25 * (reference - reference.mean()).abs().max()
    lm.restore(model)
    K.restore(model)
    assert not any(getattr(type(m), "_leantune_pinned", False) for m in hub), "undo puts every module back in its class"
    assert not any("forward" in m.__dict__ for m in patched)
    model.train()
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits.float(), reference, rtol=0, atol=0)


def test_the_patch_report_says_hub_kernels_are_off(tmp_path):
    pytest.importorskip("kernels")
    from leantune.patching.state import state_of

    model = _loaded(tmp_path, "llama", torch.float32, True)
    model.requires_grad_(False)
    lm.apply(model, lm.MemoryConfig.exact())
    assert any("hub kernels off" in line for line in state_of(model).report)
    model.eval()
    model.train()
    norm = model.model.layers[0].input_layernorm
    assert type(norm).__name__ == "LlamaRMSNorm" and isinstance(norm, type(norm).__mro__[1])
    assert "forward" in norm.__dict__
