"""Profiler byte counts against a hand count; memory sharing holds where promised and warns where it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leantune.memory as lm

from .conftest import batch_for, build, with_lora


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.act(self.lin(x)))


def test_profiler_matches_hand_count():
    block = _Block()
    x = torch.randn(5, 8, requires_grad=True)
    result = lm.profile(block, (x,), loss_fn=lambda out: out.sum())
    # Linear saves its input x [5, 8]; GELU its input [5, 16]; LayerNorm its input [5, 16] + mean, rstd [5, 1];
    # weights and biases are parameters and excluded. fp32 = 4 bytes.
    assert result.saved_bytes == {"linear/adapter input": 5 * 8 * 4, "activation": 5 * 16 * 4,
                                  "norm": 5 * 16 * 4 + 2 * 5 * 4}
    n_params = 8 * 16 + 16 + 16 + 16
    assert result.parameter_bytes == result.trainable_parameter_bytes == n_params * 4
    assert result.gradient_bytes == n_params * 4
    assert result.optimizer_state_bytes >= 2 * n_params * 4  # AdamW exp_avg + exp_avg_sq (+ step scalars)
    table = str(result)
    assert "saved: norm" in table and "optimizer state" in table


def _savers(model, batch):
    """storage pointer -> set of module classes that saved it, over one forward."""
    savers: dict[int, set[str]] = {}
    stack: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: stack.append(m)) for m in model.modules()]
    hooks += [m.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]) for m in model.modules()]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            savers.setdefault(ptr, set()).add(lm.profiler.categorize(stack[-1]) if stack else "other")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    for h in hooks:
        h.remove()
    loss.backward()
    return savers


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_norm_output_is_one_storage_shared_with_the_next_linear(family):
    model = with_lora(build(family))
    batch = batch_for(family)
    before = lm.profile(model, batch)
    lm.apply(model, lm.MemoryConfig.exact())
    savers = _savers(model, batch)
    shared = [s for s in savers.values() if "norm" in s and len(s) > 1]
    assert shared, "no storage saved by both a norm and its consumer"
    after = lm.profile(model, batch)
    norm_records = [r for r in after.records if r.category == "norm"]
    # what the norms add on their own is one rstd per row (the output is shared with the consumer)
    consumer_ptrs = [r for r in norm_records if r.shape[-1] != 1]
    assert all(r.shape[-1] == 1 for r in norm_records if r not in consumer_ptrs)
    assert after.total_saved_bytes < before.total_saved_bytes
    lm.restore(model)


def test_llama_norm_saves_only_rstd_in_profile():
    model = with_lora(build("llama"))
    batch = batch_for("llama")
    lm.apply(model, lm.MemoryConfig.exact())
    result = lm.profile(model, batch)
    rows = batch["input_ids"].numel()
    norm_only = [r for r in result.records if r.category == "norm" and r.shape[-1] == 1]
    # 2 norms per layer x 2 layers + final norm, each one fp32 rstd per row, except layer 0's input norm: its
    # input (the frozen embedding output) needs no gradient, so it saves nothing at all
    assert sum(r.nbytes for r in norm_only) == 4 * rows * 4
    lm.restore(model)


def test_warns_when_lora_dropout_breaks_sharing():
    model = with_lora(build("llama"), dropout=0.1)
    with pytest.warns(lm.SharingWarning, match="lora_dropout=0.1"):
        lm.apply(model, lm.MemoryConfig.exact())
    lm.restore(model)


def test_warns_under_autocast():
    model = with_lora(build("llama"))
    lm.apply(model, lm.MemoryConfig.exact())
    with pytest.warns(lm.SharingWarning, match="autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch_for("llama")).loss.backward()
    lm.restore(model)


def test_warns_on_adapter_dtype_mismatch():
    model = build("llama").to(torch.bfloat16)
    model = with_lora(model)  # peft's default autocast_adapter_dtype=True keeps the adapters in fp32
    lm.apply(model, lm.MemoryConfig.exact())
    with pytest.warns(lm.SharingWarning, match="peft casts a copy"):
        model(**batch_for("llama")).loss.backward()
    lm.restore(model)


def test_no_sharing_warning_in_the_supported_setup(recwarn):
    model = with_lora(build("llama"))
    lm.apply(model, lm.MemoryConfig.exact())
    model(**batch_for("llama")).loss.backward()
    assert not [w for w in recwarn if issubclass(w.category, lm.SharingWarning)]
    lm.restore(model)
