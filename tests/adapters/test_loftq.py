"""LoftQ-style initialisation (``leantune.adapters.loftq``): the alternation against hand-written quantizers, the
error it leaves, and every adapter's forward after it equal to ``Q_T + L R`` (α/r honoured), also on a real
bitsandbytes NF4 base."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import datasets
import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import leantune
from leantune._utils import LeanTuneError
from leantune.adapters.loftq import int4_roundtrip, loftq, loftq_init, nf4_roundtrip, quantize_base_4bit, quantizer
from leantune.kernels.l4q import served_weight
from leantune.memory import MemoryConfig

NF4_CODES = bnbf.get_4bit_type("nf4", device="cpu").tolist()  # bitsandbytes' 16 NF4 values


def _nf4_by_hand(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """NF4 absmax quantization written out: each number → the nearest NF4 code of w / absmax(block), × absmax."""
    flat = w.double().reshape(-1, block)
    absmax = flat.abs().amax(-1, keepdim=True)
    codes = torch.tensor(NF4_CODES, dtype=torch.float64)
    nearest = codes[(flat / absmax)[..., None].sub(codes).abs().argmin(-1)]
    return (nearest * absmax).reshape(w.shape)


def test_nf4_roundtrip_is_bitsandbytes_nf4():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    ours = nf4_roundtrip(w).double()
    by_hand = _nf4_by_hand(w)
    # ties between two codes may go either way; everything else is the nearest code
    assert (ours - by_hand).abs().max() < 1e-6 or ((ours - by_hand).abs() > 1e-6).float().mean() < 1e-3


@pytest.mark.parametrize("weights", ["gaussian", "student-t3"])
@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_error_never_grows_and_beats_plain_quantization(weights, quant):
    """Spec §3 / §7.8: ‖W − Q_t − L_t R_t‖ is non-increasing over t on these fixtures and T = 1 already beats
    ‖W − Q(W)‖ (the residual's top-r part is removed)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(128, 128, generator=gen)
    if weights == "student-t3":
        w = torch.distributions.StudentT(3.0).sample((128, 128))
    result = loftq(w, rank=8, quantize=quantizer(quant), iters=5)
    errors = result.errors
    assert errors[1] < errors[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors[1:], errors[2:])), errors
    reconstruction = result.base + result.left @ result.right
    assert float(torch.linalg.matrix_norm(w - reconstruction) / torch.linalg.matrix_norm(w)) == pytest.approx(
        errors[-1], rel=1e-5)
    # the base is on the quantizer's grid: quantizing it again changes nothing
    torch.testing.assert_close(quantizer(quant)(result.base), result.base, rtol=0, atol=1e-6)


def test_int4_roundtrip_is_the_min_max_grid():
    w = torch.tensor([[-1.0, -0.2, 0.1, 0.5]])
    s = 1.5 / 15
    z = -8 + 1.0 / s
    want = (torch.clamp(torch.round(w / s + z), -8, 7) - z) * s
    torch.testing.assert_close(int4_roundtrip(w, group=4), want)


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


CONFIGS = {
    "peft LoRA": lambda: LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], lora_dropout=0.0),
    "ALLoRA": lambda: leantune.ALLoRAConfig(r=4, target_modules=["q_proj", "down_proj"]),
    "DyLoRA": lambda: leantune.DyLoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    "LoRA-XS": lambda: leantune.LoraXSConfig(r=4, lora_alpha=2, target_modules=["q_proj", "down_proj"]),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_adapter_starts_at_q_plus_lr(method):
    """After loftq_init each adapted linear computes x (Q_T + L R)ᵀ with L R from the alternation run on the
    original weight (the scale α/r of each method divided out), and the model is closer to the original than the
    plain quantized model is."""
    original = _tiny()
    model = get_peft_model(_tiny(), CONFIGS[method]())
    report = loftq_init(model, quant_type="nf4", iters=3, progress=False)
    assert len(report) == 4
    x = torch.randn(3, 128)
    for name, errors in report.items():
        layer = model.get_submodule(name)
        w = original.get_submodule(name.removeprefix("base_model.model.")).weight.detach()
        ref = loftq(w, 4, quantizer("nf4"), iters=3)
        xi = x[:, : w.shape[1]]
        with torch.no_grad():
            torch.testing.assert_close(layer(xi), xi @ (ref.base + ref.left @ ref.right).T, rtol=1e-4, atol=1e-5)
        assert errors[-1] < errors[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loftq_then_a_real_4bit_base(dtype):
    """quantize_base_4bit puts the LoftQ base into bitsandbytes NF4 layers without changing it (re-quantizing an
    NF4 grid is exact in fp32; in bf16 the grid values were rounded to bf16 first, so to bf16 rounding), so the
    4-bit model computes Q_T + L R and trains; evaluation computes what training computes, on every CPU
    (bitsandbytes' AVX512-BF16-only eval repack is off: ``one_bnb_cpu_path``)."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM._from_config(_tiny().config, dtype=dtype), CONFIGS["ALLoRA"]())
    loftq_init(model, iters=2, progress=False)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert quantize_base_4bit(model, compute_dtype=dtype) == 4
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    model.eval()
    with torch.no_grad():
        served = model(input_ids=ids).logits
    torch.testing.assert_close(served, before, **tolerance)
    assert layer.get_base_layer().weight.quant_state.absmax.dtype == torch.float32  # never rounded to bf16
    model.train()
    loss = model(input_ids=ids, labels=ids)
    assert torch.equal(loss.logits.detach(), served)
    loss.loss.backward()
    assert layer.allora_A["default"].grad is not None


def test_refusals():
    nola = get_peft_model(_tiny(), leantune.NolaConfig(r=4, num_basis_A=8, num_basis_B=8, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="not a free product"):
        loftq_init(nola, progress=False)
    with pytest.raises(LeanTuneError, match="no peft LoRA"):
        loftq_init(_tiny(), progress=False)
    allora = get_peft_model(_tiny(), CONFIGS["ALLoRA"]())
    quantize_base_4bit(allora)
    with pytest.raises(LeanTuneError, match="full-precision nn.Linear"):
        loftq_init(allora, progress=False)
    with pytest.raises(ValueError, match="quant_type"):
        quantizer("fp8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loftq_hands_off_to_l4q(dtype):
    """Spec §7.9: after loftq_init an L4Q layer's base is Q_T, α·B·A is L_T R_T (so the weight its quantizer sees is
    LoftQ's reconstruction Q_T + L_T R_T), its grid is the one Q_T was rounded on (with the adapter off the forward
    is Q_T exactly), and the first forward is the L4Q op on those values. The alternation is run here again, by
    hand, with L4Q's own 3-bit per-group quantizer."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, dtype=dtype)
    torch.manual_seed(0)
    original = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM._from_config(cfg, dtype=dtype), leantune.L4QConfig(
        r=4, lora_alpha=8, bits=3, group_size=32, target_modules=["q_proj", "down_proj"]))
    report = loftq_init(model, iters=3, progress=False)
    assert len(report) == 2 and all(errors[-1] < errors[0] for errors in report.values())
    for name in report:
        layer = model.get_submodule(name)
        w = original.get_submodule(name.removeprefix("base_model.model.")).weight.detach().float()
        ref = loftq(w, 4, lambda m: int4_roundtrip(m, 32, bits=3), iters=3)
        w0 = layer.base_weight().detach().float()
        torch.testing.assert_close(w0, ref.base.to(dtype).float(), rtol=0, atol=0)
        b, a = layer.l4q_B["default"].detach(), layer.l4q_A["default"].detach()
        reconstruction = (ref.base + ref.left @ ref.right).to(dtype).float()
        torch.testing.assert_close(w0 + layer.scaling["default"] * b.float() @ a.float(), reconstruction,
                                   rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-6)
        scale, zero = layer.l4q_scale["default"].detach(), layer.l4q_zero["default"].detach()
        base_alone = served_weight(w0.double(), a.double(), torch.zeros_like(b).double(), scale.double(),
                                   zero.double(), 1.0, 3)
        torch.testing.assert_close(base_alone, ref.base.double(), rtol=0, atol=1e-6)  # Q_T is on the grid
        x = torch.randn(5, layer.in_features, dtype=dtype)
        with torch.no_grad():  # the L4Q op on the handed-off values: x Ŵᵀ with Ŵ = FQ(Q_T + L_T R_T) in W0's dtype
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.quantized("default")[0]),
                                       rtol=0, atol=0)


def test_loftq_on_a_4bit_base_with_memory_trains_and_resumes_through_trainer(tmp_path):
    """The whole stack in bf16: LoftQ init → bitsandbytes NF4 base → LeanTuneCallback with every leantune.memory
    technique → Trainer, checkpoint at step 2 of 4, resume_from_checkpoint: the adapter ends bit for bit where the
    uninterrupted run does."""
    ids = torch.randint(1, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def trainer():
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM._from_config(_tiny().config, dtype=torch.bfloat16),
                               CONFIGS["ALLoRA"]())
        loftq_init(model, iters=2, progress=False)
        quantize_base_4bit(model, compute_dtype=torch.bfloat16)
        args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                   learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to=[],
                                   use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1)
        callback = leantune.LeanTuneCallback(memory=MemoryConfig.all(), verbose=False)
        return callback.setup(T.Trainer(model=model, args=args, train_dataset=data))

    def adapter(t):
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}

    whole = trainer()
    start = adapter(whole)
    whole.train()
    final = adapter(whole)
    assert all(not torch.equal(final[n], start[n]) for n in final)
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(adapter(resumed)[n], final[n]) for n in final)
