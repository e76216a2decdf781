"""The chunked LM-head loss (``MemoryConfig(chunked_loss=True)``): the same loss and gradients as transformers'
unfused ``ForCausalLMLoss``, for every head parameterisation, with ignored tokens and gradient accumulation, in fp64,
fp32 and bf16 — and the [tokens × vocab] logits never exist."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForCausalLM

import leantune.memory as lm
from leantune.kernels.chunked_loss import chunked_head_loss, default_chunk
from leantune.memory.peak import peak_bytes

CHUNKED = dict(ms_norms=False, approx_activations=False, fused_gated_mlp=False, chunked_loss=True,
               loss_chunk_tokens=5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("count", [None, 50], ids=["mean", "num_items"])
def test_op_equals_cross_entropy(dtype, tol, chunk, count):
    torch.manual_seed(0)
    n, h, v = 37, 16, 101  # odd sizes
    head = torch.nn.Linear(h, v).to(dtype)
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,))
    y[::4] = -100
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    ref = F.cross_entropy(head(x).to(wide), y, reduction="mean" if count is None else "sum")
    ref = ref if count is None else ref / count
    expected = torch.autograd.grad(ref, [x, head.weight, head.bias])
    loss = chunked_head_loss(x, y, head, list(head.parameters()), num_items_in_batch=count, chunk=chunk)
    got = torch.autograd.grad(loss, [x, head.weight, head.bias])
    assert torch.allclose(loss, ref, rtol=tol, atol=0)
    for a, b in zip(got, expected):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max())


def test_all_ignored_is_nan_like_torch_and_a_frozen_head_gets_no_gradient():
    head = torch.nn.Linear(8, 11).requires_grad_(False)
    x = torch.randn(6, 8, requires_grad=True)
    y = torch.full((6,), -100)
    assert torch.isnan(chunked_head_loss(x, y, head)) and torch.isnan(F.cross_entropy(head(x), y))
    y[2] = 3
    loss = chunked_head_loss(x, y, head, chunk=2)
    loss.backward()
    assert head.weight.grad is None and x.grad is not None and bool((x.grad[[0, 1, 3, 4, 5]] == 0).all())


def test_default_chunk_bounds_the_transient_logits():
    assert default_chunk(4096, 128256, 4096) == 128  # Liger's rule: 32 chunks
    assert default_chunk(4096, 128256, 4096, floor=256) == 256  # what a CPU asks for
    assert default_chunk(3, 100, 64) == 2 and default_chunk(3, 100, 64, floor=256) == 3
    assert default_chunk(1, 10, 64) == 1


def _llama(dtype=torch.float64, vocab=96):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # a final norm far from 1, so folding it into lm_head is not a no-op
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model.train()


def _gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0)).to(dtype)  # no dropout: both runs alike
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model.train()


def _batch(vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    return ids, labels


def _reference_loss(model, ids, labels, count=None):
    """The unfused loss in the model's arithmetic (fp64 logits stay fp64, unlike HF's .float())."""
    logits = model(input_ids=ids).logits
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    loss = F.cross_entropy(logits.to(wide).flatten(0, 1), shift.flatten(), reduction="mean" if count is None else "sum")
    return loss if count is None else loss / count


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(plain, patched, ids, labels, tol, count=None):
    ref = _reference_loss(plain, ids, labels, count)
    ref.backward()
    kwargs = {} if count is None else {"num_items_in_batch": count}
    out = patched(input_ids=ids, labels=labels, **kwargs)
    assert out.logits is None  # never materialised
    out.loss.backward()
    assert torch.allclose(out.loss.double(), ref.double(), rtol=tol, atol=0), (float(out.loss), float(ref))
    a, b = _grads(plain), _grads(patched)
    assert a.keys() == b.keys() and a
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= tol * max(float(a[name].abs().max()), 1e-30), name


HEADS = ["plain", "lora_on_lm_head", "modules_to_save_other_name", "lora_with_folded_norms"]


@pytest.mark.parametrize("head", HEADS)
def test_llama_every_head_float64(head):
    plain = _llama()
    if head == "lora_on_lm_head" or head == "lora_with_folded_norms":
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False)
        plain = get_peft_model(plain, config, autocast_adapter_dtype=False)
    elif head == "modules_to_save_other_name":
        config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
        plain = get_peft_model(plain, config, adapter_name="other", autocast_adapter_dtype=False)
    patched = copy.deepcopy(plain)
    memory = dict(CHUNKED, ms_norms=True) if head == "lora_with_folded_norms" else CHUNKED
    lm.apply(patched, lm.MemoryConfig(**memory))
    if head == "lora_with_folded_norms":  # the same folded norms (incl. the final one into lm_head), unfused loss
        lm.apply(plain, lm.MemoryConfig(**dict(memory, chunked_loss=False)))
    _compare(plain, patched, *_batch(), tol=1e-10)


def test_gpt2_tied_head_float64():
    plain = _gpt2()
    patched = copy.deepcopy(plain)
    lm.apply(patched, lm.MemoryConfig(**CHUNKED))
    _compare(plain, patched, *_batch(), tol=1e-10)
    assert patched.transformer.wte.weight.grad is not None  # the tied weight got both contributions


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_llama_fp32_bf16_with_every_memory_patch(dtype, tol):
    plain = get_peft_model(_llama(dtype), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0),
                           autocast_adapter_dtype=False)
    patched = copy.deepcopy(plain)
    lm.apply(patched, lm.MemoryConfig(chunked_loss=True, loss_chunk_tokens=5))  # + norms, 2-bit act., fused MLP
    lm.apply(plain, lm.MemoryConfig())  # the same patches without the chunked loss
    _compare(plain, patched, *_batch(), tol=tol)


def test_gradient_accumulation_with_num_items_equals_one_batch():
    """Two micro-batches with different numbers of valid tokens, each divided by the window's count (what Trainer
    passes as num_items_in_batch), sum to the gradient of one batch of both."""
    whole = _llama()
    micro = copy.deepcopy(whole)
    lm.apply(micro, lm.MemoryConfig(**CHUNKED))
    (ids1, lab1), (ids2, lab2) = _batch(seed=1), _batch(seed=2)
    lab2[1, :7] = -100
    count = int((F.pad(lab1, (0, 1), value=-100)[..., 1:] != -100).sum() + (F.pad(lab2, (0, 1), value=-100)[..., 1:]
                                                                               != -100).sum())
    for ids, lab in ((ids1, lab1), (ids2, lab2)):
        micro(input_ids=ids, labels=lab, num_items_in_batch=torch.tensor(count)).loss.backward()
    _reference_loss(whole, torch.cat([ids1, ids2]), torch.cat([lab1, lab2])).backward()
    a, b = _grads(whole), _grads(micro)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-10, atol=1e-14), name


def test_eval_and_no_labels_run_the_models_own_forward():
    model = _llama(torch.float32)
    lm.apply(model, lm.MemoryConfig(**CHUNKED))
    ids, labels = _batch()
    assert model(input_ids=ids).logits.shape == (2, 11, 96)
    model.eval()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.loss is not None
    lm.restore(model)
    assert "forward" not in vars(model)


def test_the_logits_never_exist():
    """Peak memory of the loss's forward + backward: the unfused loss holds several N × V fp32 buffers; the chunked
    one a chunk of them, under 1/8 of one N × V fp32 logits tensor besides what both keep."""
    torch.manual_seed(0)
    n, h, v = 4096, 64, 8192  # 128 MiB of fp32 logits; chunks of 64 tokens
    head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    x = torch.randn(n, h, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def unfused():
        F.cross_entropy(head(x).float(), y).backward()

    def chunked():
        chunked_head_loss(x, y, head, chunk=64).backward()

    logits_bytes = n * v * 4
    base = list(head.parameters()) + [x, y]
    assert peak_bytes(unfused, base) > logits_bytes
    assert peak_bytes(chunked, base) < logits_bytes / 8


def test_unsupported_model_is_refused_naming_it():
    model = RobertaForCausalLM(RobertaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=4, is_decoder=True))
    with pytest.raises(ValueError, match="RobertaForCausalLM.*chunked_loss=False"):
        lm.apply(model, lm.MemoryConfig(**CHUNKED))


def test_trainer_with_gradient_accumulation_trains_as_the_unfused_loss(tmp_path):
    """LeanTuneCallback(memory=MemoryConfig(chunked_loss=True)) under Trainer with gradient accumulation (Trainer
    passes num_items_in_batch): the same weights after 3 optimizer steps as the unfused loss (fp32, to rounding)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    import leantune

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (8, 10), generator=g)
    labels = ids.clone()
    labels[::2, :6] = -100  # micro-batches with different numbers of valid tokens
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    trained = []
    for chunked in (False, True):
        model = _llama(torch.float32)
        memory = lm.MemoryConfig(ms_norms=False, approx_activations=False, fused_gated_mlp=False,
                                 chunked_loss=chunked, loss_chunk_tokens=7)
        callback = leantune.LeanTuneCallback(adapter=LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                lora_dropout=0.0), memory=memory, verbose=False)
        args = TrainingArguments(str(tmp_path / str(chunked)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True, seed=0)
        trainer = callback.setup(Trainer(model=model, args=args, train_dataset=data))
        trainer.train()
        trained.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    plain, chunked = trained
    assert any("lora_B" in name and bool(value.abs().sum() > 0) for name, value in plain.items())  # it trained
    for name in plain:
        assert torch.allclose(plain[name], chunked[name], rtol=1e-5, atol=1e-6), name


def test_callback_takes_memory_as_a_dict_and_names_unknown_options():
    import leantune

    callback = leantune.LeanTuneCallback(memory={"chunked_loss": True, "ms_norms": False}, verbose=False)
    assert callback.memory.chunked_loss and not callback.memory.ms_norms and callback.memory.fused_gated_mlp
    with pytest.raises(ValueError, match="unknown option.*chunked_los"):
        leantune.LeanTuneCallback(memory={"chunked_los": True})


def test_profile_command_takes_chunked_loss(tmp_path, capsys):
    from leantune.memory.cli import main, memory_config_from_string

    assert memory_config_from_string("chunked_loss").chunked_loss
    _llama(torch.float32).config.save_pretrained(tmp_path)
    assert main(["profile", str(tmp_path), "--seq-len", "8", "--lora-rank", "2", "--memory", "chunked_loss",
                 "--compare"]) == 0
    assert "saved for backward" in capsys.readouterr().out


def test_shift_labels_are_taken_as_given():
    """``shift_labels`` (already aligned with the positions, as context-parallel training passes them) replaces the
    shift of ``labels``: passing the shifted labels gives the same loss and gradients as passing ``labels``."""
    ids, labels = _batch()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    losses, grads = [], []
    for kwargs in ({"labels": labels}, {"labels": torch.full_like(labels, -100), "shift_labels": shifted}):
        model = _llama()
        lm.apply(model, lm.MemoryConfig(**CHUNKED))
        loss = model(input_ids=ids, **kwargs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_liger_is_used_only_where_it_composes(monkeypatch):
    """The Liger dispatch, with a stand-in for Liger's class (Liger is Triton on CUDA, not installed here): a plain
    linear head goes to it (same loss and gradients as the torch path: "sum" ÷ count); a peft LoRA head, a hooked
    (folded) head, or a device outside LIGER_DEVICES never does."""
    import sys
    import types

    import leantune.kernels.chunked_loss as cl

    calls = []

    class FakeLiger(torch.nn.Module):  # Liger's signature and semantics, in torch
        def __init__(self, ignore_index=-100, reduction="mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, weight, x, y, bias=None):
            calls.append(weight.shape)
            return F.cross_entropy(F.linear(x, weight, bias), y, ignore_index=self.ignore_index,
                                   reduction=self.reduction)

    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = FakeLiger
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    assert cl.liger_head_loss(hidden, labels, head) is None  # CPU is not a Liger device
    monkeypatch.setattr(cl, "LIGER_DEVICES", ("cpu",))
    loss = cl.liger_head_loss(hidden, labels, head, num_items_in_batch=7)
    assert calls and loss is not None
    (gx, gw) = torch.autograd.grad(loss, (hidden, head.weight))
    ref = cl.chunked_head_loss(hidden, labels, head, [head.weight, head.bias], num_items_in_batch=7, chunk=3)
    (rx, rw) = torch.autograd.grad(ref, (hidden, head.weight))
    assert torch.allclose(loss, ref) and torch.allclose(gx, rx) and torch.allclose(gw, rw)
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 11)), LoraConfig(r=2, target_modules=["0"]))
    assert cl.liger_head_loss(hidden, labels, wrapped.base_model.model[0]) is None  # LoRA head: torch path
    hooked = torch.nn.Linear(8, 11, dtype=torch.float64)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert cl.liger_head_loss(hidden, labels, hooked) is None  # a folded final norm's hook: torch path
