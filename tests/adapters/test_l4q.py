"""L4Q as a peft tuner type: the forward is the served quantized model, trains (fp32 and bf16), saves/loads, merges,
composes with leantune.memory (its norms stay unfolded, with the reason), and exports to a transformers folder whose
logits equal the training-time forward bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import leantune
import leantune.memory
from leantune._utils import LeanTuneError
from leantune.adapters import L4QConfig
from leantune.adapters.l4q import L4QLayer
from leantune.kernels.l4q import reference_l4q_linear

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32, seed=0):
    """dtype at construction (``.to(bf16)`` would also cast the rotary ``inv_freq``, which from_pretrained does not)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM._from_config(cfg, dtype=dtype)


def batch(seed=1, n=2):
    ids = torch.randint(0, 64, (n, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def l4q_model(dtype=torch.float32, **overrides):
    options = dict(target_modules=TARGETS, group_size=16, init_weights=False)
    options.update(overrides)
    return get_peft_model(tiny_llama(dtype), L4QConfig(**options))


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, L4QLayer)}


def test_layer_forward_is_the_formula_in_float64():
    model = l4q_model(torch.float64)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    p = {k: getattr(layer, f"l4q_{k}")["default"] for k in ("A", "B", "scale", "zero")}
    want = reference_l4q_linear(x, layer.base_layer.weight, p["A"], p["B"], p["scale"], p["zero"], 2.0, 4, 1.0)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-13)


def test_minmax_init_is_round_to_nearest_of_the_base():
    """B = 0 and the min/max grid: before training the model is the plain RTN int4 model of the base weights."""
    base = tiny_llama(torch.float64)
    rtn = tiny_llama(torch.float64)
    with torch.no_grad():
        for name, module in rtn.named_modules():
            if name.split(".")[-1] in TARGETS:
                w = module.weight.view(module.weight.shape[0], -1, 16)
                low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
                s = (high - low) / 15
                z = -8 - low / s
                module.weight.copy_(((torch.clamp(torch.round(w / s + z), -8, 7) - z) * s).view_as(module.weight))
    model = get_peft_model(base, L4QConfig(target_modules=TARGETS, group_size=16, step_init="minmax"))
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, rtn(**b).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trains_every_part(dtype):
    model = l4q_model(dtype, init_weights=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".l4q_" in n for n in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    b = batch(n=4)
    losses = []
    for _ in range(30):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0], losses  # ln 64 = 4.16 → ≈3.7 in 30 steps on random text
    moved = {name.split(".l4q_")[1].split(".")[0] for name, p in model.named_parameters()
             if p.requires_grad and not torch.equal(p.detach(), start[name])}
    # A, B and the steps move everywhere; a zero point only moves once some entry of its group clips (∂L/∂z = 0
    # inside the grid), so it must have moved somewhere
    assert moved == {"A", "B", "scale", "zero"}, moved
    assert all(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters() if ".l4q_scale" in n)


def test_save_load_merge_unmerge():
    model = l4q_model()
    b = batch()
    with torch.no_grad():
        want = model(**b).logits
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers(model).items()}
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, want, rtol=1e-6, atol=1e-6)
    model.unmerge_adapter()
    for name, layer in layers(model).items():
        assert torch.equal(layer.base_layer.weight, originals[name])  # the original W0 back, bit for bit
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**b).logits, want, rtol=1e-6, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = l4q_model()
    b = batch()
    with torch.no_grad():
        want = model(**b).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "L4Q"
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, want)


def test_refusals():
    import bitsandbytes as bnb

    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj = bnb.nn.Linear4bit(32, 32, bias=False)
    with pytest.raises(TypeError, match="unquantized nn.Linear"):
        get_peft_model(model, L4QConfig(target_modules=["q_proj"], group_size=16))
    with pytest.raises(ValueError, match="does not divide the 48 inputs"):
        get_peft_model(tiny_llama(), L4QConfig(target_modules=["down_proj"], group_size=32))
    with pytest.raises(ValueError, match="bits"):
        L4QConfig(bits=9)
    two = l4q_model()
    two.add_adapter("other", L4QConfig(target_modules=TARGETS, group_size=16))
    two.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="activate one"):
        two(**batch())


def test_memory_techniques_compose_and_say_why_norms_stay():
    """leantune.memory on an L4Q model: norms before L4Q linears cannot fold (rounding is not linear in γ) and the
    report says so; everything else applies and the gradients equal eager's to fp32 rounding."""
    b = batch(n=3)
    eager = l4q_model()
    patched = l4q_model()
    handle = leantune.memory.apply(patched, leantune.memory.MemoryConfig())
    assert any("L4QLayer" in line and "cannot absorb" in line for line in handle.report), handle.report
    for m in (eager, patched):
        m.train()
        m(**b).loss.backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    for n, p in patched.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_export_quantized_loads_with_training_logits(tmp_path, dtype):
    """`leantune export --to quantized` → `from_pretrained` gives the training-time logits bit for bit."""
    pytest.importorskip("torchao")
    from transformers import TorchAoConfig
    from transformers.utils.quantization_config import QuantizationMethod

    model = l4q_model(dtype)
    with torch.no_grad():  # train a little so A, B, s, z are all away from their init
        for layer in layers(model).values():
            layer.l4q_scale["default"].mul_(1.1)
            layer.l4q_zero["default"].add_(0.3)
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "served"
    tiny_llama(dtype).save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    b = batch()
    with torch.no_grad():
        want = model(**b).logits
    if dtype == torch.bfloat16:  # the command line, once (a process start costs ~6 s)
        run = subprocess.run([sys.executable, "-m", "leantune.cli", "export", str(adapter_dir), "--to", "quantized",
                              str(out), "--base", str(base_dir)], capture_output=True, text=True)
        assert run.returncode == 0 and run.stderr == "", run.stderr
    else:
        leantune.export_quantized(base_dir, adapter_dir, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == QuantizationMethod.TORCHAO
    TorchAoConfig.from_dict(config)
    served = LlamaForCausalLM.from_pretrained(out, dtype=dtype)
    weight = served.model.layers[1].mlp.down_proj.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert weight.qdata.dtype == torch.int8 and -8 <= weight.qdata.min() and weight.qdata.max() <= 7
    assert weight.scale.shape == weight.zero_point.shape == (32, 3)
    assert type(served.model.layers[1].self_attn.k_proj.weight).__name__ == "Parameter"  # not adapted: not converted
    with torch.no_grad():
        assert torch.equal(served(**b).logits, want)


def test_export_refusals(tmp_path, monkeypatch):
    from leantune.integrations import quantized_export

    model = get_peft_model(tiny_llama(), leantune.LoraXSConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LeanTuneError, match="needs an L4Q adapter"):
        quantized_export.quantized_state(model)
    monkeypatch.setattr(quantized_export, "torchao_version", lambda: None)
    with pytest.raises(LeanTuneError, match="torchao is not installed: pip install"):
        quantized_export.to_quantized_model(l4q_model())


@pytest.mark.parametrize("mode", ["lora", "quantized_base"])
def test_warmup_then_the_quantizer(mode):
    """Warm-up (spec §1.4; the L4Q code trains unquantized LoRA first, the paper warms up Q(W) + αAB): before step
    ``warmup_steps`` the layer computes x(W0 + αBA)ᵀ or x FQ(W0)ᵀ + α x(BA)ᵀ (float64, by hand) and s, z get no
    gradient; at that step s, z are initialised from W0 + αBA by step_init and the forward is L4Q's; a fresh layer
    (loaded for serving, no training step yet) computes L4Q's forward."""
    model = l4q_model(torch.float64, warmup_steps=2, warmup_mode=mode, step_init="absmax")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    p = {k: getattr(layer, f"l4q_{k}")["default"] for k in ("A", "B", "scale", "zero")}
    x = torch.randn(3, 32, dtype=torch.float64)
    w0, alpha = layer.base_layer.weight, layer.scaling["default"]
    l4q = lambda: reference_l4q_linear(x, w0, p["A"], p["B"], p["scale"], p["zero"], alpha, 4, 1.0)  # noqa: E731
    torch.testing.assert_close(layer(x), l4q(), rtol=0, atol=1e-13)  # no step yet: the served forward
    for step in (0, 1):
        model.base_model.before_train_step(step)
        out = layer(x)
        if mode == "lora":
            want = x @ (w0 + alpha * p["B"] @ p["A"]).T
        else:
            eye, no_b = torch.eye(32, dtype=torch.float64), torch.zeros_like(p["B"])
            quantized_w0 = reference_l4q_linear(eye, w0, p["A"], no_b, p["scale"], p["zero"], alpha, 4, 1.0).T
            want = x @ quantized_w0.T + alpha * x @ (p["B"] @ p["A"]).T
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        grads = torch.autograd.grad(out.sum(), [p["A"], p["B"], p["scale"], p["zero"]], allow_unused=True)
        assert grads[0] is not None and grads[1] is not None
        assert all(g is None or not g.any() for g in grads[2:])  # the grid does not train while warming up
        with torch.no_grad():
            p["B"].add_(0.01)  # as if trained: the grid at the switch is W0 + αBA's, not W0's
    model.base_model.before_train_step(2)
    scale, zero = leantune.adapters.l4q.initial_step((w0 + alpha * p["B"] @ p["A"]).detach(), 2, 4, "absmax")
    assert torch.equal(p["scale"].detach(), scale) and torch.equal(p["zero"].detach(), zero)
    torch.testing.assert_close(layer(x), l4q(), rtol=0, atol=1e-13)
    model.base_model.before_train_step(3)  # later steps (and a run resumed after the switch) keep the grid
    assert torch.equal(p["scale"].detach(), scale)
    with pytest.raises(ValueError, match="warmup_mode"):
        L4QConfig(warmup_mode="qat")


def test_warmup_resumes_bit_for_bit(tmp_path):
    """Through LeanTuneCallback + Trainer: 4 steps with a 2-step warm-up, resumed from the checkpoint inside the
    warm-up (step 1), at the switch (step 2) and after it (step 3), end with the uninterrupted run's weights. The 4
    steps are one epoch: transformers 5.4 (our lowest version) resumes a checkpoint inside a *later* epoch with
    other batches (plain peft LoRA too; later versions resume it exactly), which is not what this test is about."""
    ids = torch.randint(1, 64, (16, 9), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def trainer(out):
        args = T.TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                                   save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                                   seed=0, logging_steps=1)
        config = L4QConfig(target_modules=TARGETS, group_size=16, warmup_steps=2)
        callback = leantune.LeanTuneCallback(adapter=config, verbose=False)
        return callback.setup(T.Trainer(model=tiny_llama(), args=args, train_dataset=data))

    def trained(t):
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}

    whole = trainer(tmp_path)
    start = trained(whole)
    whole.train()
    final = trained(whole)
    assert all(not torch.equal(final[n], start[n]) for n in final if "l4q_" in n)
    warm = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))  # after the 2 warm-up steps
    for name, value in start.items():
        saved = warm[name.replace(".default", "")]
        assert torch.equal(saved, value) == ("l4q_scale" in name or "l4q_zero" in name), name  # only A, B moved
    for checkpoint in (1, 2, 3):
        resumed = trainer(tmp_path)
        resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{checkpoint}"))
        again = trained(resumed)
        assert all(torch.equal(again[n], final[n]) for n in final), checkpoint
