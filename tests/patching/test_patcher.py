"""The one patcher: memory options and kernels in any order give the same model; undo is exact; print shows it."""

from __future__ import annotations

import copy

import pytest
import torch

import leantune.kernels as K
import leantune.memory as lm
from leantune.kernels import fused_mlp
from leantune.patching import describe
from tests.memory.conftest import batch_for, build, with_lora

FAMILIES = ["llama", "gpt2", "bert", "t5"]


def _run(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _without_kernels(described: dict[str, str]) -> dict[str, str]:
    """``describe()`` minus the kernel-only patches (fused adapter linear, unfolded MS norm)."""
    kernel_only = ("adapter:fused", "norm:unfolded")
    kept = {k: ", ".join(p for p in v.split(", ") if p not in kernel_only) for k, v in described.items()}
    return {k: v for k, v in kept.items() if v}


def _memory_then_kernels(model):
    lm.apply(model, lm.MemoryConfig.all())
    K.apply(model, enable=True)


def _kernels_then_memory(model):
    K.apply(model, enable=True)
    lm.apply(model, lm.MemoryConfig.all())


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_and_kernels_in_either_order_give_the_same_model(family):
    base = with_lora(build(family), trained=True)
    batch = batch_for(family)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _memory_then_kernels(a)
    _kernels_then_memory(b)
    assert describe(a) == describe(b) and describe(a)
    assert repr(a) == repr(b)
    out_a, grads_a = _run(a, batch)
    out_b, grads_b = _run(b, batch)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_restoring_one_view_keeps_the_other_and_restoring_both_is_exact(family):
    model = with_lora(build(family), trained=True)
    batch = batch_for(family)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference, _ = _run(model, batch)
    _memory_then_kernels(model)
    both = describe(model)
    assert any("adapter:fused" in v for v in both.values())
    K.restore(model)
    memory_only = describe(model)
    assert not K.patched_modules(model) and not any("adapter:fused" in v for v in memory_only.values())
    assert any(v == "norm:folded" for v in memory_only.values())  # the memory view is untouched
    assert _without_kernels(both) == memory_only
    lm.restore(model)
    assert describe(model) == {}
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    assert torch.equal(_run(model, batch)[0], reference)


def test_patched_modules_print_as_what_they_are():
    model = with_lora(build("llama"))
    _memory_then_kernels(model)
    text = repr(model)
    for name in ("MSRMSNorm", "FusedGatedMLP", "FusedLoRALinear", "GammaScaledLinear", "VeLoRALinear"):
        assert name in text, name
    assert "affine folded into q_proj, k_proj, v_proj" in text
    gpt2 = with_lora(build("gpt2"))
    lm.apply(gpt2, lm.MemoryConfig.all())
    assert "ReGELU2(forward=NewGELUActivation)" in repr(gpt2)
    lm.restore(model), lm.restore(gpt2), K.restore(model)
    assert "MSRMSNorm" not in repr(model) and "ReGELU2" not in repr(gpt2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_folded_model_trains_the_same_adapter_as_eager(family):
    """The folded consumers' adapters keep their own parameterisation: every LoRA gradient (A and B) equals eager."""
    eager = with_lora(build(family), trained=True)
    patched = copy.deepcopy(eager)
    batch = batch_for(family)
    out_e, grads_e = _run(eager, batch)
    lm.apply(patched, lm.MemoryConfig.exact())
    out_p, grads_p = _run(patched, batch)
    torch.testing.assert_close(out_p, out_e, atol=2e-5, rtol=1e-5)
    assert grads_e.keys() == grads_p.keys() and any("lora_A" in n for n in grads_e)
    for name in grads_e:
        torch.testing.assert_close(grads_p[name], grads_e[name], atol=2e-5, rtol=1e-4)


def test_whole_mlp_op_runs_on_folded_lora_consumers(monkeypatch):
    """gate/up read the folded norm's ŷ: the fused MLP still takes them whole (A diag γ formed inside)."""
    calls = []
    original = fused_mlp.GatedMLPFunction.apply
    monkeypatch.setattr(fused_mlp.GatedMLPFunction, "apply", lambda *a: calls.append(1) or original(*a))
    model = with_lora(build("llama"), trained=True)
    batch = batch_for("llama")
    reference = _run(copy.deepcopy(model), batch)[0]
    lm.apply(model, lm.MemoryConfig.exact())
    out, _ = _run(model, batch)
    assert len(calls) == 2  # one per decoder layer
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-5)


def test_merging_while_folded_is_refused_and_works_after_restore():
    model = with_lora(build("llama"), trained=True)
    batch = batch_for("llama")
    reference = _run(copy.deepcopy(model), batch)[0]
    lm.apply(model, lm.MemoryConfig.exact())
    with pytest.raises(RuntimeError, match="before merging"):
        model.merge_and_unload()
    lm.restore(model)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, reference, atol=2e-5, rtol=1e-5)
