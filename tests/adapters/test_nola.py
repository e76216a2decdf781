"""NOLA checked against independent references: the formula with materialised bases in float64 autograd."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from leantune.adapters.nola import BASIS_CHUNK, NolaConfig, NolaFunction, NolaLayer, basis_chunks, offset_A0

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def nola_model(k: int = 70, l: int = 90, r: int = 4, **kw) -> torch.nn.Module:
    return get_peft_model(tiny_llama(), NolaConfig(r=r, num_basis_A=k, num_basis_B=l, target_modules=TARGETS, **kw))


def randomize_coefficients(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "nola_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def all_bases(seed: int, kind: str, count: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.cat([b for _, b in basis_chunks(seed, kind, count, shape)])


def reference_delta(layer: NolaLayer, adapter: str = "default") -> torch.Tensor:
    """``s · (Σ β_j B_j)(A0 + Σ α_i A_i)`` in float64 from fully materialised bases."""
    seed, r = int(layer.nola_seed[adapter]), layer.r[adapter]
    k, l = layer.num_basis[adapter]
    a_bases = all_bases(seed, "A", k, (r, layer.in_features)).double()
    b_bases = all_bases(seed, "B", l, (layer.out_features, r)).double()
    alpha, beta = layer.nola_alpha[adapter].double(), layer.nola_beta[adapter].double()
    a = offset_A0(seed, r, layer.in_features).double() + torch.einsum("k,kri->ri", alpha, a_bases)
    b = torch.einsum("l,lor->or", beta, b_bases)
    return layer.scaling[adapter] * b @ a


def test_bases_are_reproducible_per_seed_and_differ_across_seeds():
    shape = (3, 10)
    first = all_bases(123, "A", 2 * BASIS_CHUNK + 5, shape)
    again = all_bases(123, "A", 2 * BASIS_CHUNK + 5, shape)
    other = all_bases(124, "A", 2 * BASIS_CHUNK + 5, shape)
    assert torch.equal(first, again)  # bit-identical
    assert not torch.equal(first, other)
    assert not torch.equal(first[:BASIS_CHUNK], first[BASIS_CHUNK : 2 * BASIS_CHUNK])  # chunks differ
    assert not torch.equal(all_bases(123, "B", 7, shape), all_bases(123, "A", 7, shape))


def test_bases_do_not_touch_the_global_rng_and_have_the_documented_scale():
    state = torch.get_rng_state()
    k = 300
    bases = all_bases(7, "A", k, (8, 64))
    assert torch.equal(state, torch.get_rng_state())
    assert bases.abs().max() <= 1 / math.sqrt(k)
    assert bases.var().item() == pytest.approx(1 / (3 * k), rel=0.05)  # U(-1,1)/√k


def test_custom_backward_passes_gradcheck_in_float64():
    layer = nola_model(k=70, l=9, r=3).base_model.model.model.layers[0].self_attn.q_proj
    layer.double()
    source = layer.chunk_source("default", torch.device("cpu"))
    a0 = offset_A0(int(layer.nola_seed["default"]), 3, layer.in_features).double()
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(70, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: NolaFunction.apply(x, a, b, a0, source, 0.7), (x, alpha, beta))


def test_custom_backward_equals_autograd_on_materialised_bases():
    model = nola_model()
    randomize_coefficients(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features)
    out = layer.adapter_output(x, "default")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ours = (layer.nola_alpha["default"].grad.clone(), layer.nola_beta["default"].grad.clone())
    # reference: the same coefficients as leaves, everything materialised, plain float64 autograd
    alpha = layer.nola_alpha["default"].detach().double().requires_grad_()
    beta = layer.nola_beta["default"].detach().double().requires_grad_()
    with torch.no_grad():
        layer.nola_alpha["default"].copy_(alpha)
        layer.nola_beta["default"].copy_(beta)
    seed, r = int(layer.nola_seed["default"]), layer.r["default"]
    k, l = layer.num_basis["default"]
    a = offset_A0(seed, r, layer.in_features).double() + torch.einsum(
        "k,kri->ri", alpha, all_bases(seed, "A", k, (r, layer.in_features)).double())
    b = torch.einsum("l,lor->or", beta, all_bases(seed, "B", l, (layer.out_features, r)).double())
    ref = layer.scaling["default"] * (x.double() @ a.T) @ b.T
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[0].double(), alpha.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[1].double(), beta.grad, rtol=1e-4, atol=1e-6)


def test_bases_are_not_saved_for_backward():
    layer = nola_model(k=200, l=200, r=4).base_model.model.model.layers[0].mlp.down_proj
    randomize_coefficients(layer)
    saved = []
    x = torch.randn(2, 3, layer.in_features)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer.adapter_output(x, "default")
    basis_numel = 200 * 4 * layer.in_features
    assert saved and max(saved) < basis_numel // 10  # x, h, A, B only


def test_trainable_count_is_modules_times_k_plus_l_and_independent_of_rank():
    for r in (1, 8):
        model = nola_model(k=70, l=90, r=r)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == 2 * len(TARGETS) * (70 + 90)


def test_init_is_the_base_model_with_a_nonzero_coefficient_gradient():
    base = tiny_llama()
    x = ids()
    with torch.no_grad():
        expected = base(input_ids=x).logits
    model = get_peft_model(base, NolaConfig(r=4, num_basis_A=70, num_basis_B=90, target_modules=TARGETS))
    out = model(input_ids=x, labels=x)
    assert torch.equal(out.logits.detach(), expected)  # ΔW = 0 exactly
    out.loss.backward()
    beta_grads = [p.grad for n, p in model.named_parameters() if "nola_beta" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in beta_grads)


def test_delta_weight_and_lora_export_factors_match_the_formula():
    model = nola_model()
    randomize_coefficients(model)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    b_eff, a_eff = layer.lowrank_factors("default")
    assert b_eff.shape == (layer.out_features, 4) and a_eff.shape == (4, layer.in_features)
    torch.testing.assert_close((b_eff @ a_eff).double(), reference_delta(layer), rtol=1e-5, atol=1e-6)


def test_merge_equals_unmerged_and_disable_gives_base():
    base = tiny_llama()
    x = ids()
    with torch.no_grad():
        base_out = base(input_ids=x).logits
    model = get_peft_model(base, NolaConfig(r=4, num_basis_A=70, num_basis_B=90, target_modules=TARGETS))
    randomize_coefficients(model)
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        assert not torch.allclose(unmerged, base_out, atol=1e-3)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, base_out, rtol=0, atol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=x).logits, unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        merged_model = model.merge_and_unload()
        torch.testing.assert_close(merged_model(input_ids=x).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_cached_bases_and_inference_materialisation_give_the_same_outputs():
    x = ids()
    outputs = []
    for cache in (False, True):
        model = nola_model(cache_bases=cache)
        randomize_coefficients(model)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            inference = model(input_ids=x).logits
        outputs.append((out.logits.detach(), grads, inference))
    (l0, g0, i0), (l1, g1, i1) = outputs
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    torch.testing.assert_close(i0, l0, rtol=1e-5, atol=1e-5)


def test_checkpoint_holds_only_coefficients_seeds_shapes_and_fingerprints_and_reloads_exactly(tmp_path):
    model = nola_model()
    randomize_coefficients(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {key.rsplit(".", 1)[-1] for key in state}
    assert kinds == {"nola_alpha", "nola_beta", "nola_seed", "nola_fingerprint", "nola_shape"}
    assert sum(t.numel() for k, t in state.items() if "nola_alpha" in k or "nola_beta" in k) == 6 * (70 + 90)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, expected)
    # a checkpoint whose bases would regenerate differently is refused with a clear error
    key = next(k for k in state if k.endswith("nola_fingerprint"))
    state[key] = state[key] + 1e-3
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="fingerprint"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="num_basis_A"):
        NolaConfig(num_basis_A=0)


def test_inference_cache_sees_updates_made_through_data():
    """Optimizers that write through ``p.data`` leave the version counter alone; the cached inference factors must
    still follow the coefficients (a stale cache served the initial adapter after Trainer training)."""
    from tests.adapters.models import batch_for, tiny_model

    model = get_peft_model(tiny_model("llama"), NolaConfig(r=4, num_basis_A=8, num_basis_B=8,
                                                           target_modules=["q_proj"])).eval()
    x = batch_for("llama")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=x).logits
        for name, p in model.named_parameters():
            if "nola_beta" in name:
                p.data.add_(0.5)
        after = model(input_ids=x).logits
    assert not torch.allclose(before, after)
    model.train()
    with torch.enable_grad():
        trained_path = model(input_ids=x).logits
    torch.testing.assert_close(after, trained_path, atol=1e-5, rtol=1e-5)
