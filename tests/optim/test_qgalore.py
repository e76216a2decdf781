"""Q-GaLore (``leantune/optim/qgalore.py``): INT8 weights updated with stochastic rounding, INT4 lazy projectors.

References: GaLoreAdamW bit for bit with quantization off; a hand-computed sequence of refresh steps for the lazy rule;
the float update followed by the blockwise quantizer for one INT8 step; unbiasedness of many small SR updates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from leantune.kernels.int8_linear import Int8Linear, is_int8_weight
from leantune.kernels.quantize import dequantize, quantize
from leantune.optim import (
    GaLoreAdamW,
    OptimizerConfig,
    QGaLoreAdamW,
    build_optimizer,
    dequantize_weights,
    quantize_weights,
)
from tests.optim.helpers import batches, loss_fn, make_net


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.Tanh(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 6)).to(dtype)


def _data(n, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 48, generator=g).to(dtype), torch.randn(16, 6, generator=g).to(dtype)) for _ in range(n)]


def _run(model, opt, data):
    for x, y in data:
        ((model(x).float() - y.float()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def _cfg(name="q_galore_adamw", **kw):
    base = dict(rank=8, update_proj_gap=2, lr=1e-2, target_modules=["0", "2"])
    return OptimizerConfig(name, **{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantization_off_is_galore_adamw_bit_for_bit(dtype):
    """Float weights, projectors not quantized, lazy refresh off: the same weights and moments as GaLoreAdamW after
    8 steps with refreshes at 0, 2, 4, 6."""
    off = {"int8_weights": False, "proj_bits": None, "lazy_threshold": None}
    ref, ours = _net(dtype=dtype), _net(dtype=dtype)
    opt_ref = build_optimizer(ref, _cfg("galore_adamw"))
    opt_ours = build_optimizer(ours, _cfg(optimizer_kwargs=off))
    assert type(opt_ours) is QGaLoreAdamW and type(opt_ref) is GaLoreAdamW
    data = _data(8, dtype)
    _run(ref, opt_ref, data)
    _run(ours, opt_ours, data)
    for a, b in zip(ref.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_ref.state[p_ref][key], opt_ours.state[p_ours][key])


def _drive_lazy(cosines, gap=2, steps=60, **kw):
    """Refresh steps of one 32 × 16 weight whose gradient at its k-th refresh is u v_kᵀ, the angle between v_{k−1}
    and v_k chosen so that |cos| = cosines[k−1] (signs alternate: the rule must ignore them)."""
    w = nn.Parameter(torch.zeros(32, 16, dtype=torch.float64))
    opt = QGaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": gap}], lr=0.0, **kw)
    u = torch.linspace(1, 2, 32, dtype=torch.float64)
    angles = [0.0]
    for c in cosines:
        angles.append(angles[-1] + math.acos(c))
    refreshes = []
    for step in range(steps):
        k = min(opt.state[w].get("svd_count", 0), len(angles) - 1)
        v = torch.zeros(16, dtype=torch.float64)
        v[0], v[1] = math.cos(angles[k]), math.sin(angles[k])
        before = opt.state[w].get("svd_count", 0)
        w.grad = (-1) ** k * torch.outer(u, v) + 1e-3 * torch.eye(32, 16, dtype=torch.float64)
        opt.step()
        if opt.state[w]["svd_count"] > before:
            refreshes.append(step)
    return refreshes, opt.state[w]


def test_lazy_refresh_follows_the_hand_computed_sequence():
    """|cos| = 1, .2, .6, .3, .5, .9, .1, .1 at refreshes 1..8, threshold 0.4, queue 5, factor 2, T = 2:
    the queue first fills at refresh 5 (mean .52 → gap 4), then means .50 → 8 and .48 → 16, then .38 (kept).
    Refreshes at steps 0, 2, 4, 6, 8, 10, 10+4, 14+8, 22+16 = 38, next at 54."""
    steps, state = _drive_lazy([1.0, 0.2, 0.6, 0.3, 0.5, 0.9, 0.1, 0.1, 0.1, 0.1], steps=60)
    assert steps == [0, 2, 4, 6, 8, 10, 14, 22, 38, 54]
    assert state["proj_gap"] == 16


def test_lazy_refresh_off_cap_and_dissimilar_subspaces():
    assert _drive_lazy([1.0] * 12, steps=24, lazy_threshold=None)[0] == list(range(0, 24, 2))  # GaLore's T
    assert _drive_lazy([0.1] * 12, steps=24)[0] == list(range(0, 24, 2))  # never similar: never lazier
    capped, state = _drive_lazy([1.0] * 12, steps=40, max_proj_gap=6)
    assert capped == [0, 2, 4, 6, 8, 10, 14, 20, 26, 32, 38] and state["proj_gap"] == 6


def test_int4_projector_is_stored_packed_and_used_dequantized():
    net = _net()
    opt = build_optimizer(net, _cfg())
    _run(net, opt, _data(1))
    st = opt.state[net[0].weight]
    assert "proj_ortho" not in st and st["proj_codes"].dtype == torch.uint8
    r, k = 8, 48
    assert st["proj_codes"].numel() == math.ceil(r * k / 256) * 128
    P = dequantize(torch.stack([(st["proj_codes"] & 0xF).to(torch.int8) - 8,
                                (st["proj_codes"] >> 4).to(torch.int8) - 8], 1).reshape(-1),
                   st["proj_scales"], (st["proj_rows"], st["proj_cols"]), 256)
    eye = P @ P.t()  # nearly orthonormal rows: INT4 error ~10% relative (the spec's measurement of Q-GaLore's)
    assert (eye - torch.eye(r)).abs().max() < 0.3


def test_one_int8_step_is_the_float_step_then_the_quantizer():
    """With nearest rounding, one step = GaLore on deq(W) in fp32, then blockwise absmax INT8 of the result."""
    net = _net()
    opt = build_optimizer(net, _cfg(optimizer_kwargs={"stochastic_round": False, "proj_bits": None}))
    layer = net[0]
    assert isinstance(layer, Int8Linear) and is_int8_weight(layer.weight)
    float_net = copy.deepcopy(net)
    dequantize_weights(float_net, torch.float32)
    ref = build_optimizer(float_net, _cfg("galore_adamw"))
    x, y = _data(1)[0]
    for model, o in ((net, opt), (float_net, ref)):
        ((model(x) - y) ** 2).mean().backward()
        o.step()
    w_ref = float_net[0].weight.detach()
    codes, scales = quantize(w_ref, 8, 256, per_row=True)
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scales)


def test_a_zero_update_changes_no_code():
    net = _net()
    opt = build_optimizer(net, _cfg(lr=0.0))
    before = net[0].weight.clone(), net[0].weight_scale.clone()
    _run(net, opt, _data(3))
    assert torch.equal(net[0].weight, before[0]) and torch.equal(net[0].weight_scale, before[1])


def test_many_small_updates_are_unbiased_with_stochastic_rounding():
    """200 updates of 0.05 of an INT8 step each, towards 0 (every element but its block's absmax, so the scales stay put): with
    SR the weights move by 10 steps on average (|bias| < 0.1 step over the matrix); nearest rounding loses them all."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 256) * 0.02
    codes, scales = quantize(w0, 8, 256, per_row=True)
    start = dequantize(codes, scales, w0.shape, 256, per_row=True)
    step = scales.reshape(64, 1)
    keep = torch.ones_like(w0)
    keep[torch.arange(64), start.abs().argmax(1)] = 0  # the absmax element fixes the scale
    direction = -torch.sign(start) * keep  # inward: no element outgrows its block's absmax
    update = 0.05 * step * direction
    sr, rtn = (codes, scales), (codes, scales)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        sr = quantize(dequantize(*sr, w0.shape, 256, per_row=True) + update, 8, 256, per_row=True, generator=gen)
        rtn = quantize(dequantize(*rtn, w0.shape, 256, per_row=True) + update, 8, 256, per_row=True)
    assert torch.equal(sr[1], scales)
    moved_sr = (dequantize(*sr, w0.shape, 256, per_row=True) - start) / step * direction
    moved_rtn = (dequantize(*rtn, w0.shape, 256, per_row=True) - start) / step
    inner = direction != 0
    assert (moved_sr[inner] - 10.0).mean().abs() < 0.1
    assert moved_rtn.abs().max() < 1e-4  # nearest rounding: every update lost


@pytest.mark.parametrize("name", ["q_galore_adamw", "q_galore_adamw8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_train_save_resume_bit_exact(name, dtype, tmp_path):
    """Save at step 5 (after a lazy doubling: gap 1, queue 2), resume in a new model + optimizer, 5 more steps: INT8
    codes, scales, biases and every state tensor equal the uninterrupted run bit for bit (SR noise is seeded per
    parameter and step, nothing depends on the global RNG)."""
    kw = dict(update_proj_gap=1, optimizer_kwargs={"lazy_queue": 2, "lazy_threshold": 0.0})
    data = _data(10, dtype)
    full = _net(dtype=dtype)
    opt = build_optimizer(full, _cfg(name, **kw))
    _run(full, opt, data)
    half = _net(dtype=dtype)
    opt_half = build_optimizer(half, _cfg(name, **kw))
    _run(half, opt_half, data[:5])
    assert opt_half.state[half[0].weight]["proj_gap"] > 1
    torch.save({"model": half.state_dict(), "opt": opt_half.state_dict()}, tmp_path / "ckpt.pt")
    torch.manual_seed(999)  # a different global RNG after the restart
    resumed = _net(seed=3, dtype=dtype)
    opt_resumed = build_optimizer(resumed, _cfg(name, **kw))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed.load_state_dict(ckpt["opt"])
    _run(resumed, opt_resumed, data[5:])
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(opt.state, opt_resumed.state):
        for key, value in opt.state[p].items():
            other = opt_resumed.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert full[0].weight_scale.dtype == torch.float32
    assert opt.state[full[0].weight]["exp_avg"].dtype == torch.float32  # INT8 weights: fp32 moments (r·M < 4096)


@pytest.mark.parametrize("name", ["q_galore_adamw", "q_galore_adamw8bit"])
def test_layerwise_equals_step(name):
    """Per-layer updates (the INT8 linear calls the optimizer from its backward) give the weights of step()."""
    a, b = _net(), _net()
    opt_a = build_optimizer(a, _cfg(name))
    opt_b = build_optimizer(b, _cfg(name, layerwise=True))
    data = _data(6)
    _run(a, opt_a, data)
    for x, y in data:
        ((b(x) - y) ** 2).mean().backward()
        assert b[0].weight.qgrad is None  # stepped and freed inside backward
        opt_b.step()
        opt_b.zero_grad()
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_int8_training_follows_float_galore_and_counts_svds():
    """The INT8 run's loss follows GaLore's in float (same data, 30 steps: within 10%), and its lazy projectors ran
    fewer SVDs than GaLore's one per parameter every T = 2 steps (2 × 15)."""
    data = _data(30)
    losses = {}
    for name in ("galore_adamw", "q_galore_adamw"):
        net = _net()
        opt = build_optimizer(net, _cfg(name, lr=3e-3, update_proj_gap=2))
        _run(net, opt, data)
        with torch.no_grad():
            losses[name] = sum(float(((net(x) - y) ** 2).mean()) for x, y in data[-5:]) / 5
    assert abs(losses["q_galore_adamw"] - losses["galore_adamw"]) < 0.1 * losses["galore_adamw"]
    counts = opt.svd_counts()
    assert len(counts) == 2 and sum(counts.values()) < 2 * 15


def test_int8_memory_and_conversion_round_trip():
    """INT8 + fp32 block scales are ~26% of the fp32 weight; dequantize_weights restores nn.Linear (and Conv1D for
    GPT-2) with the INT8 model's outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)).eval()
    fp32_bytes = sum(m.weight.numel() * 4 for m in gpt.modules() if type(m).__name__ == "Conv1D")
    names = quantize_weights(gpt)
    assert len(names) == 8 and all(isinstance(gpt.get_submodule(n), Int8Linear) for n in names)
    int8_bytes = sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in gpt.modules() if isinstance(m, Int8Linear))
    assert int8_bytes / fp32_bytes < 0.27
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        out_int8 = gpt(ids).logits
    dequantize_weights(gpt)
    assert type(gpt.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(gpt(ids).logits, out_int8, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_fix():
    net = _net()
    with pytest.raises(ValueError, match="lazy INT4 projector is an SVD basis"):
        build_optimizer(net, _cfg(projector="dct"))
    assert isinstance(net[0], nn.Linear)  # refused before the weights were quantized
    with pytest.raises(ValueError, match="proj_bits"):
        build_optimizer(net, _cfg(optimizer_kwargs={"proj_bits": 8}))
    with pytest.raises(ValueError, match="int8_weights"):
        build_optimizer(net, _cfg(optimizer_kwargs={"int8_weights": "yes"}))
    with pytest.raises(ValueError, match="rank=200 exceeds"):
        build_optimizer(net, _cfg(rank=200))
    assert isinstance(net[0], nn.Linear)


def test_tall_wide_net_trains_with_helpers():
    """Both projection sides (tall, wide, square weights) and a plain LayerNorm in one optimizer."""
    net = make_net()
    opt = build_optimizer(net, OptimizerConfig("q_galore_adamw8bit", rank=4, update_proj_gap=2, lr=1e-2))
    first = None
    for xy in batches(1) * 20:
        loss = loss_fn(net, xy)
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < first
    assert {type(m).__name__ for m in net.modules()} >= {"Int8Linear", "LayerNorm"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("memory", ["all", "budget", "norms_mlp"])
def test_with_leantune_memory_the_gradients_are_those_without(arch, memory):
    """Q-GaLore's INT8 model with leantune.memory (the exact techniques, or an activation budget) gets the INT8
    weights' and the float parameters' gradients of the same INT8 model without it (to fp32 rounding), whichever
    was set up first."""
    import warnings

    import transformers as T

    import leantune
    from leantune.memory import MemoryConfig

    def model():
        torch.manual_seed(0)
        if arch == "llama":
            return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    tie_word_embeddings=False)).train()
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()

    config = {"all": MemoryConfig(approx_activations=False),  # the 2-bit activation backward is approximate
              "budget": MemoryConfig(budget=0.3, approx_activations=False),
              "norms_mlp": MemoryConfig.none(ms_norms=True, fused_gated_mlp=True)}[memory]
    ids = torch.randint(0, 64, (2, 8))
    grads = []
    for order in ("none", "memory-first", "optimizer-first"):
        net = model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if order == "memory-first":
                leantune.memory.apply(net, config)
            build_optimizer(net, OptimizerConfig("q_galore_adamw", rank=4, lr=1e-2))
            if order == "optimizer-first":
                leantune.memory.apply(net, config)
            net(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: (p.qgrad if is_int8_weight(p) else p.grad) for n, p in net.named_parameters()})
    assert sum(is_int8_weight(p) for p in net.parameters()) >= 8
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_copies_keep_training_their_int8_weights():
    """A deep copy (or an unpickled model) keeps the link from each INT8 weight to its scales, so the copy trains
    like the original; an int8 tensor that is not an Int8Linear's weight is refused, never silently left untrained."""
    net = _net()
    build_optimizer(net, _cfg())
    twin = copy.deepcopy(net)
    assert is_int8_weight(twin[0].weight) and twin[0].weight.int8_module is twin[0]
    opt_a, opt_b = build_optimizer(net, _cfg()), build_optimizer(twin, _cfg())
    data = _data(3)
    _run(net, opt_a, data)
    _run(twin, opt_b, data)
    for (k, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    stray = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="not the weight of a leantune Int8Linear"):
        QGaLoreAdamW([{"params": [stray], "rank": 2}])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_saved_int8_model_loads_as_a_plain_model(dtype, tmp_path):
    """save_pretrained of a trained INT8 model writes deq(W) under the usual keys: from_pretrained of the plain
    architecture reads float weights and gives the INT8 model's outputs (never the codes as numbers)."""
    import transformers as T

    def llama():
        torch.manual_seed(0)
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=300,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                tie_word_embeddings=False)).to(dtype)

    model = llama()
    opt = build_optimizer(model, OptimizerConfig("q_galore_adamw", rank=4, lr=1e-2))
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    T.logging.set_verbosity_error()  # the scales are keys the plain model does not have: reported, ignored
    plain = T.LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert plain.model.layers[0].mlp.up_proj.weight.abs().max() < 1  # weights, not codes up to 127
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if dtype == torch.float32 else 2e-3)
