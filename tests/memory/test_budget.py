"""The activation budget (``MemoryConfig(budget=...)``, ``leantune.patching.budget`` / ``recompute``): every mode
gives the gradients of the model without it, bitwise on the CPU (fp32 and bf16, every family with a layer stack,
with and without leantune's techniques, with dropout); the live-storage counter sees what saved-tensor hooks miss;
offload packs one tensor per layer and reuses its buffers; the solver is the convex-hull choice, checked by hand;
budgets are met, monotone, a no-op above ``keep``, and fraction and bytes agree; bad input is refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from leantune.memory import MemoryConfig, apply, enable_checkpointing
from leantune.patching.budget import LayerCosts, ModeCost, parse_budget, solve
from leantune.patching.live import held_for_backward
from leantune.patching.recompute import LOSSY_MODES, MODES, Offloader, run_layer
from leantune.patching.state import state_of
from leantune.plan.trace import saved_bytes

from .conftest import batch_for, build, with_lora

FAMILIES = ["llama", "qwen2", "gpt2", "bert", "vit"]
SELECTIVE = ("save_matmuls", "recompute_mlp", "save_attention")


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _lora(family, dtype, dropout=0.0):
    model = with_lora(build(family), dropout=dropout).to(dtype)
    model.train()
    return model


def _cast(batch, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("techniques", [False, True], ids=["plain", "exact_techniques"])
def test_every_mode_gives_the_gradients_of_keep_bitwise(family, dtype, techniques):
    batch = _cast(batch_for(family), dtype)
    reference = _lora(family, dtype)
    if techniques:
        apply(reference, MemoryConfig.exact(keep_original_weights=False))
    loss0, grads0 = _grads(reference, batch)
    for mode in [m for m in MODES if m not in ("keep", "offload") + LOSSY_MODES]:  # offload: its own test
        model = _lora(family, dtype)  # the same weights (seeded)
        make = MemoryConfig.exact if techniques else MemoryConfig.none
        apply(model, make(keep_original_weights=False, layer_modes=mode))
        loss, grads = _grads(model, batch)
        assert torch.equal(loss, loss0), mode
        assert grads.keys() == grads0.keys()
        for name in grads0:
            assert torch.equal(grads[name], grads0[name]), (mode, name)


def test_dropout_is_replayed_exactly():
    """Recomputation restores the RNG state: GPT-2 with dropout 0.1 everywhere gives the same loss bit for bit and the
    same gradients to fp32 rounding. (Not bitwise: on an AMD EPYC CPU the LoRA-B weight gradients of the recomputed
    layers came out 1 ulp apart — the backward's GEMMs read the recomputed activations in another layout there, and
    GEMM rounding depends on the layout. A dropout mask that was not replayed changes gradients by O(1).)"""
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0,
                       attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)
    base = with_lora(T.GPT2LMHeadModel(cfg), dropout=0.1)
    batch = batch_for("gpt2")
    for mode in ("checkpoint", "save_matmuls", "recompute_mlp"):
        plain, patched = copy.deepcopy(base).train(), copy.deepcopy(base).train()
        apply(patched, MemoryConfig.none(layer_modes=mode))
        torch.manual_seed(5)
        loss0, grads0 = _grads(plain, batch)
        torch.manual_seed(5)
        loss, grads = _grads(patched, batch)
        assert torch.equal(loss, loss0)
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def test_the_kv_cache_is_dropped_in_recomputed_layers():
    """Training with use_cache=True (the default config) — the cache would grow in the recomputation."""
    model = _lora("llama", torch.float32)
    model.config.use_cache = True
    apply(model, MemoryConfig.none(layer_modes="checkpoint"))
    batch = batch_for("llama")
    _grads(model, {**batch, "use_cache": True})


def _live(model, batch):
    return held_for_backward(model, batch)


def test_the_live_counter_agrees_with_saved_tensor_hooks_and_sees_the_selective_cache():
    batch = batch_for("llama")
    plain = _lora("llama", torch.float32)
    assert _live(plain, batch) == saved_bytes(plain, batch, emulate_fused_attention=False)
    cached = _lora("llama", torch.float32)
    apply(cached, MemoryConfig.none(layer_modes="save_matmuls"))
    checkpointed = _lora("llama", torch.float32)
    apply(checkpointed, MemoryConfig.none(layer_modes="checkpoint"))
    hooks = saved_bytes(cached, batch, emulate_fused_attention=False)
    assert hooks == saved_bytes(checkpointed, batch, emulate_fused_attention=False)  # hooks miss the cache
    assert _live(cached, batch) > _live(checkpointed, batch)                          # the counter does not


def test_offload_packs_one_input_per_layer_and_reuses_its_buffers():
    layer = _lora("llama", torch.float32).base_model.model.model.layers[0]
    offloader = Offloader(host_copies_on_cpu=True)
    x = torch.randn(2, 8, 32, requires_grad=True)
    cos, sin = torch.ones(2, 8, 8), torch.zeros(2, 8, 8)
    kwargs = {"position_embeddings": (cos, sin), "attention_mask": None}

    def step(mode):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = run_layer(layer.forward, mode, (x,), kwargs, offloader)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()
        return x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    ref_x, ref = step("keep")
    buffers = []
    for round_ in range(3):
        got_x, got = step("offload")
        assert torch.equal(got_x, ref_x) and all(torch.equal(got[n], ref[n]) for n in ref)
        assert offloader.packs == offloader.unpacks == round_ + 1  # one [b, s, h] per step and layer
        buffers.append(id(offloader._pool[((2, 8, 32), torch.float32)][0]))
    assert len(set(buffers)) == 1  # the same pinned buffer every step


def _costs(*modes):
    return LayerCosts([ModeCost(m, b, e) for m, b, e in modes], step=10.0, input_bytes=1)


def test_solver_is_the_convex_hull_by_hand():
    # keep 100 B / 0 s; a 60 B / 1 s; b 50 B / 4 s (above the segment a–c: never on the hull); c 10 B / 3 s
    costs = _costs(("keep", 100, 0.0), ("a", 60, 1.0), ("b", 50, 4.0), ("c", 10, 3.0), ("d", 120, 0.5))
    assert solve(costs, 4, 400) == ["keep"] * 4                  # at or above keep: nothing changes
    assert solve(costs, 4, 360) == ["a", "keep", "keep", "keep"]  # one layer down to a (360 B)
    assert solve(costs, 4, 240) == ["a"] * 4                     # the hull's first corner, 4 s
    assert solve(costs, 4, 200) == ["c", "a", "a", "a"]          # 190 B, 6 s (b would cost 7 s for 230 B)
    assert solve(costs, 4, 40) == ["c"] * 4
    assert solve(costs, 4, 1) == ["c"] * 4                       # below the minimum: the leanest everywhere


def test_solver_settles_the_last_layer_on_the_cheapest_mode_that_fits():
    costs = _costs(("keep", 100, 0.0), ("ckpt", 10, 5.0), ("mid", 70, 2.0))  # mid is above keep–ckpt
    # hull moves layer 0 to ckpt (110 B ≤ 150) but mid (170 B) does not fit; with 170 B allowed mid is chosen
    assert solve(costs, 2, 150) == ["ckpt", "keep"]
    assert solve(costs, 2, 170) == ["mid", "keep"]


def _decided(model):
    policy = state_of(model).policy
    (key, modes), = policy.decisions.items()
    return modes, policy.layer_costs[key]


@pytest.mark.parametrize("budget", [1.0, 0.6, 0.3, 0.05])
def test_budgets_are_met_and_fraction_and_bytes_agree(budget):
    batch = batch_for("llama")
    model = _lora("llama", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply(model, MemoryConfig.exact(budget=budget))
        _grads(model, batch)
    modes, costs = _decided(model)
    kept = sum(costs.cost(m).bytes for m in modes)
    keep = costs.cost("keep").bytes * len(modes)
    leanest = min(c.bytes for c in costs.modes) * len(modes)
    assert kept <= max(budget * keep, leanest)
    if budget == 1.0:
        assert modes == ["keep"] * len(modes)
    other = _lora("llama", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply(other, MemoryConfig.exact(budget=int(budget * keep) if budget * keep > 1 else 2))
        _grads(other, batch)
    assert _decided(other)[0] == modes or budget * keep < leanest


def test_smaller_budgets_keep_fewer_bytes_measured():
    batch = batch_for("llama")
    measured = []
    for budget in (1.0, 0.7, 0.4, 0.1):
        model = _lora("llama", torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply(model, MemoryConfig.exact(budget=budget))
            _grads(model, batch)  # the decision
        measured.append(_live(model, batch))
    assert measured == sorted(measured, reverse=True) and measured[0] > measured[-1]


def test_an_unreachable_budget_warns_and_the_report_says_what_was_chosen(capsys):
    model = _lora("llama", torch.float32)
    apply(model, MemoryConfig.exact(budget="1KB", verbose=True))
    with pytest.warns(UserWarning, match="below what the decoder layers can keep"):
        _grads(model, batch_for("llama"))
    assert "checkpoint" in capsys.readouterr().out
    assert any("layers 0-1" in line for line in state_of(model).policy.report())


def test_evaluation_and_no_grad_run_the_layers_as_they_are():
    model = _lora("llama", torch.float32)
    apply(model, MemoryConfig.exact(budget=0.5))
    model.eval()
    with torch.no_grad():
        model(**batch_for("llama"))
    assert state_of(model).policy.decisions == {}


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "abc", "0%", "-3GB", True, [0.5]])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="budget"):
        MemoryConfig(budget=bad)


def test_parse_budget():
    assert parse_budget("25%") == ("fraction", 0.25)
    assert parse_budget(0.5) == ("fraction", 0.5)
    assert parse_budget("6GB") == ("bytes", 6e9)
    assert parse_budget("512MiB") == ("bytes", 512 * 2.0**20)  # binary units are binary (was 512e6)
    assert parse_budget(4096) == ("bytes", 4096.0)


def test_refusals_name_the_part_and_what_to_use_instead():
    with pytest.raises(ValueError, match="budget or layer_modes"):
        MemoryConfig(budget=0.5, layer_modes="checkpoint")
    with pytest.raises(ValueError, match="layer_modes"):
        MemoryConfig(layer_modes="everything")
    model = _lora("llama", torch.float32)
    with pytest.raises(ValueError, match="one per decoder layer"):
        apply(model, MemoryConfig.none(layer_modes=("keep", "checkpoint", "keep")))
    checkpointed = _lora("llama", torch.float32)
    enable_checkpointing(checkpointed)  # transformers' own (activation_checkpointing_enable or its older name)
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        apply(checkpointed, MemoryConfig.none(budget=0.5))
    t5 = build("t5")
    with pytest.raises(ValueError, match="two"):
        apply(t5, MemoryConfig.none(budget=0.5))


def test_undo_restores_the_layers():
    model = _lora("llama", torch.float32)
    batch = batch_for("llama")
    before = _live(model, batch)
    handle = apply(model, MemoryConfig.none(layer_modes="checkpoint"))
    assert _live(model, batch) < before
    handle.undo()
    assert _live(model, batch) == before
    assert all("forward" not in layer.__dict__ for layer in model.base_model.model.model.layers)


def test_trainer_with_a_budget_trains_bitwise_as_without(tmp_path):
    """LeanTuneCallback(memory={"budget": 0.3, ...}) under Trainer, bf16 weights, gradient accumulation and the
    chunked loss: the same adapter weights after 3 optimizer steps as the same stack without the budget — bitwise
    (recomputation replays the same kernels) — and the budget's decision is in the callback's model."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import Trainer, TrainingArguments

    import leantune

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (8, 12), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trained, models = [], []
    for budget in (None, 0.3):
        model = build("llama").to(torch.bfloat16)
        memory = {"approx_activations": False, "chunked_loss": True, "budget": budget}
        callback = leantune.LeanTuneCallback(adapter=LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0),
                                             memory=memory, verbose=False)
        args = TrainingArguments(str(tmp_path / str(budget)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = callback.setup(Trainer(model=model, args=args, train_dataset=data))
            trainer.train()
        trained.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
        models.append(trainer.model)
    assert any(bool(v.abs().sum() > 0) for n, v in trained[0].items() if "lora_B" in n)
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])
    policy = state_of(models[1]).policy
    assert policy.decisions and any(m != "keep" for modes in policy.decisions.values() for m in modes)


def test_profile_command_prints_the_policy_and_refuses_a_bad_budget(tmp_path, capsys):
    from leantune.cli import main

    build("llama").config.save_pretrained(tmp_path)
    assert main(["profile", str(tmp_path), "--seq-len", "16", "--lora-rank", "2", "--memory",
                 "fused_gated_mlp,budget:30%"]) == 0
    out = capsys.readouterr()
    assert "activation budget: budget 0.3" in out.out or "activation budget: budget 30%" in out.out
    assert "held for backward" in out.out and out.err == ""
    assert main(["profile", str(tmp_path), "--memory", "budget:lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leantune: error:") and "budget" in err[0]


def test_division_is_lossy_as_stated_and_smaller():
    """DIVISION: the forward (and loss) is unchanged, the saved tensors shrink (≈ 4.5 bits an element + small
    tensors kept as they are), the gradients change but stay aligned with the exact ones (measured: cosine
    similarity 0.87 of the whole LoRA gradient on a random 4-layer Llama at 64 tokens; held to ≥ 0.8)."""
    from leantune.patching.division import pack, unpack

    x = torch.randn(4, 32, 48)
    back = unpack(pack(x))
    assert back.shape == x.shape and back.dtype == x.dtype
    assert float((back - x).norm() / x.norm()) < 0.5  # the 2-bit high-frequency part: a coarse but real copy
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    base = with_lora(T.LlamaForCausalLM(cfg))
    ids = torch.randint(1, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    exact, lossy = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    apply(lossy, MemoryConfig.none(layer_modes="division"))
    loss0, g0 = _grads(exact, batch)
    loss1, g1 = _grads(lossy, batch)
    assert torch.equal(loss0, loss1)
    a = torch.cat([g0[n].flatten() for n in g0])
    b = torch.cat([g1[n].flatten() for n in g0])
    assert 0.8 <= float(F.cosine_similarity(a, b, dim=0)) < 1.0
    assert _live(copy.deepcopy(lossy), batch) < 0.6 * _live(copy.deepcopy(exact), batch)


def test_a_budget_picks_division_only_when_named():
    batch = batch_for("llama")
    for modes, allowed in ((None, False), (("checkpoint", "division"), True)):
        model = _lora("llama", torch.float32)
        extra = {} if modes is None else {"budget_modes": modes}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply(model, MemoryConfig.none(budget=0.5, **extra))
            _grads(model, batch)
        (key, chosen), = state_of(model).policy.decisions.items()
        costs = state_of(model).policy.layer_costs[key]
        assert ("division" in [m.mode for m in costs.modes]) == allowed


def test_division_training_reaches_the_loss_of_exact_training():
    """Its effect on the loss: 60 AdamW steps (lr 3e-3) of LoRA on a 4-layer Llama memorising a batch, exact vs
    DIVISION — measured 3.19 vs 3.27 from 4.19; held to within 5% (both fall by more than 20%). At lr 1e-2 the
    DIVISION run diverged late in the same experiment (3.06 exact vs 4.08): lossy, and off unless named."""
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    base = with_lora(T.LlamaForCausalLM(cfg))
    ids = torch.randint(1, 64, (4, 32), generator=torch.Generator().manual_seed(2))
    final = {}
    for mode in ("keep", "division"):
        model = copy.deepcopy(base).train()
        apply(model, MemoryConfig.none(layer_modes=mode))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        first = None
        for _ in range(60):
            loss = model(input_ids=ids, labels=ids).loss
            first = first if first is not None else float(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
        final[mode] = float(model(input_ids=ids, labels=ids).loss)
        assert final[mode] < 0.8 * first
    assert final["division"] == pytest.approx(final["keep"], rel=0.05)
