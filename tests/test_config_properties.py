"""Property-based: any value of any field of every leantune config either builds an object that works (an adapter
that trains one step on a tiny model, memory patches that run, an optimizer that steps) or raises ``ValueError`` /
``LeanTuneError`` naming the field — never a crash deep inside torch. (peft's own fields, such as ``task_type``, are
peft's to check.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

import leantune
import leantune.memory as lm
from leantune.adapters import get_lora_sb_model
from leantune.optim import OptimizerConfig, build_optimizer
from tests.adapters.models import batch_for, tiny_model
from tests.optim.helpers import batches, loss_fn, make_net

ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=6), st.sampled_from(["all-linear", "q_proj", "svd", "random", "relu", "gelu_new", "houlsby"]),
    st.lists(st.text(max_size=5), max_size=2), st.lists(st.integers(-1, 3), max_size=2),
    st.tuples(st.floats(-0.5, 1.5), st.floats(-0.5, 1.5)), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)

# plausible values per field, mixed with ANY so that many drawn configs are valid and get trained
VALID = {
    "r": st.integers(1, 8), "init_weights": st.sampled_from([True, False, "svd", "random", "bert", "zeros_up"]),
    "lora_alpha": st.floats(0.5, 16), "r_init_std": st.floats(0, 0.1), "svd_niter": st.integers(0, 4),
    "num_init_batches": st.integers(1, 2), "eta": st.floats(0.1, 4), "norm_of": st.sampled_from(["delta_w_row",
                                                                                                  "param_row"]),
    "r_min": st.integers(1, 4), "eval_rank": st.integers(1, 4), "seed": st.integers(0, 2**31),
    "num_basis_A": st.integers(1, 80), "num_basis_B": st.integers(1, 80), "nola_alpha": st.floats(0.5, 16),
    "placement": st.sampled_from(["houlsby", "pfeiffer"]), "reduction_factor": st.floats(1, 32),
    "non_linearity": st.sampled_from(["relu", "gelu_new", "swish"]), "scaling": st.floats(-2, 2),
    "phm_dim": st.sampled_from([1, 2, 4]), "phm_rank": st.one_of(st.none(), st.integers(1, 3)),
    "phm_init_range": st.floats(0, 0.1), "layers_to_transform": st.sampled_from([0, [0], [0, 1]]),
    "velora_num_groups": st.integers(1, 64), "velora_scale": st.floats(0, 2),
    "velora_targets": st.sampled_from([("attn_out",), ("mlp_down",), ("attn_out", "mlp_down")]),
    "rank": st.integers(1, 64), "update_proj_gap": st.integers(1, 5), "lr": st.floats(0, 0.1),
    "weight_decay": st.floats(0, 0.5), "betas": st.tuples(st.floats(0, 0.99), st.floats(0, 0.999)),
    "eps": st.floats(0, 1e-3), "max_grad_norm_per_param": st.floats(0.01, 10), "accumulation_steps": st.integers(1, 3),
    "reset_every": st.integers(1, 3), "reset_moments": st.sampled_from(["all", "first"]),
    "recovery_steps": st.integers(0, 3), "refactorize": st.booleans(),
    "moment_policy": st.sampled_from(["keep", "reset", "rotate"]), "projector": st.sampled_from(list(leantune.optim.PROJECTOR_KINDS)),
    "name": st.sampled_from(sorted(leantune.optim.OPTIMIZERS)),
}

LOW_RANK = ["r", "init_weights", "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"]
ADAPTER_FIELDS = {
    leantune.LoraXSConfig: LOW_RANK + ["lora_alpha", "r_init_std", "svd_niter"],
    leantune.LoraSBConfig: LOW_RANK + ["lora_alpha", "num_init_batches", "svd_niter"],
    leantune.ALLoRAConfig: LOW_RANK + ["eta", "norm_of", "squared"],
    leantune.DyLoRAConfig: LOW_RANK + ["r_min", "lora_alpha", "frozen", "eval_rank", "seed"],
    leantune.NolaConfig: LOW_RANK + ["num_basis_A", "num_basis_B", "nola_alpha", "seed", "cache_bases"],
    leantune.BottleneckConfig: ["placement", "target_modules", "reduction_factor", "non_linearity", "init_weights",
                                "scaling", "phm", "phm_dim", "shared_phm_rule", "phm_rank", "phm_init_range",
                                "unfreeze_layer_norms", "layers_to_transform"],
    leantune.CompacterConfig: ["reduction_factor", "phm_dim", "phm_rank", "init_weights", "scaling"],
}
MEMORY_FIELDS = ["ms_norms", "approx_activations", "fused_gated_mlp", "velora", "velora_targets", "velora_num_groups",
                 "velora_scale", "fold_final_norm", "untie_embeddings", "keep_original_weights"]
OPTIMIZER_FIELDS = ["name", "rank", "update_proj_gap", "scale", "projector", "target_modules", "layerwise",
                    "moment_policy", "lr", "weight_decay", "betas", "eps", "reference_adam", "max_grad_norm_per_param",
                    "accumulation_steps", "reset_every", "reset_moments", "recovery_steps", "refactorize",
                    "optimizer_kwargs"]
OPTIMIZER_VALUES = st.one_of(ANY, st.sampled_from(sorted(leantune.optim.OPTIMIZERS) + ["svd", "dct", "rsvd", "reset",
                                                                                       "rotate", "keep"]))
SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _named(error: Exception, fields) -> bool:
    text = str(error).lower().replace(" ", "_")
    return any(f.lower() in text for f in fields)


def _draw(data, fields, values=ANY) -> dict:
    chosen = data.draw(st.lists(st.sampled_from(fields), unique=True, max_size=3))
    return {f: data.draw(st.one_of(values, VALID[f]) if f in VALID else values, label=f) for f in chosen}


def _finite_step(model) -> None:
    model.train()
    out = model(**batch_for("llama"))
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()


@pytest.mark.parametrize("cls", list(ADAPTER_FIELDS), ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_adapter_config_fields(cls, data):
    kwargs = _draw(data, ADAPTER_FIELDS[cls])
    if cls is not leantune.BottleneckConfig and cls is not leantune.CompacterConfig:
        kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    try:
        config = cls(**kwargs)
    except (ValueError, leantune.LeanTuneError) as error:
        assert _named(error, kwargs), (kwargs, error)
        event("refused by the config")
        return
    model = tiny_model("llama")
    try:
        if cls is leantune.LoraSBConfig and config.init_weights is True:
            model = get_lora_sb_model(model, config, [batch_for("llama")], lr=1e-3, progress=False)
        else:
            model = get_peft_model(model, config)
    except (ValueError, leantune.LeanTuneError) as error:  # refused at setup, naming what to change
        assert _named(error, list(kwargs) + ["rank", "r=", "target", "layer", "divisible"]), (kwargs, error)
        event("refused at setup")
        return
    _finite_step(model)
    event("trained")


@SETTINGS
@given(data=st.data())
def test_memory_config_fields(data):
    kwargs = _draw(data, MEMORY_FIELDS)
    try:
        config = lm.MemoryConfig(**kwargs)
    except ValueError as error:
        assert _named(error, kwargs), (kwargs, error)
        event("refused by the config")
        return
    from peft import LoraConfig

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules="all-linear"))
    lm.apply(model, config)
    _finite_step(model)
    lm.restore(model)
    event("trained")


@SETTINGS
@given(data=st.data())
def test_optimizer_config_fields(data):
    kwargs = _draw(data, OPTIMIZER_FIELDS, OPTIMIZER_VALUES)
    kwargs.setdefault("target_modules", ["up", "mid", "down"])
    try:
        config = OptimizerConfig(**kwargs)
        model = make_net()
        optimizer = build_optimizer(model, config)
    except ValueError as error:
        assert _named(error, list(kwargs) + ["option", "target", "accepted"]), (kwargs, error)
        event("refused")
        return
    before = [p.detach().clone() for p in model.parameters()]
    for xy in batches(2):
        loss_fn(model, xy).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), before)) or config.lr == 0
    event("stepped")
