"""`leantune merge / export / inspect` end to end on tiny models and on the real MiniLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from leantune.cli import main
from tests.adapters.models import adapt, batch_for, perturb_adapter, tiny_model

METHODS = ("lora_xs", "lora_sb", "allora", "dylora", "nola")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=[(m, a) for m in METHODS for a in ("llama", "gpt2", "bert")], ids=lambda p: "-".join(p))
def saved(request, tmp_path):
    method, arch = request.param
    base = tiny_model(arch)
    base.save_pretrained(tmp_path / "base")
    model = adapt(base, method, arch)
    perturb_adapter(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = batch_for(arch)["input_ids"]
    return tmp_path, arch, logits(model, ids), ids


def test_merge_writes_a_full_model_with_equal_outputs(saved):
    tmp, arch, expected, ids = saved
    assert main(["merge", "--base", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--out", str(tmp / "m")]) == 0
    assert (tmp / "m" / "model.safetensors").is_file() and (tmp / "m" / "config.json").is_file()
    auto = transformers.AutoModelForSequenceClassification if arch == "bert" else transformers.AutoModelForCausalLM
    merged = auto.from_pretrained(tmp / "m").eval()
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)


def test_export_to_plain_lora_gives_equal_outputs(saved):
    tmp, arch, expected, ids = saved
    assert main(["export", str(tmp / "adapter"), "--to", "lora", str(tmp / "lora"), "--base", str(tmp / "base")]) == 0
    config = json.loads((tmp / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    auto = transformers.AutoModelForSequenceClassification if arch == "bert" else transformers.AutoModelForCausalLM
    kwargs = {"num_labels": 3} if arch == "bert" else {}
    lora = PeftModel.from_pretrained(auto.from_pretrained(tmp / "base", **kwargs), tmp / "lora").eval()
    assert type(lora.base_model).__name__ == "LoraModel"
    torch.testing.assert_close(logits(lora, ids), expected, atol=1e-5, rtol=0)


def test_inspect_reports_method_ranks_and_counts(tmp_path, capsys):
    base = tiny_model("llama")
    model = adapt(base, "lora_xs", "llama")
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA_XS" and info["rank"] == 4 and info["adapted_modules"] == 6
    assert info["trainable_adapter_parameters"] == 6 * 16
    assert info["frozen_adapter_parameters"] == sum(
        b.numel() for n, b in model.named_buffers() if "loraxs_A" in n or "loraxs_B" in n)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "LORA_XS" in capsys.readouterr().out


def test_inspect_also_reads_plain_peft_lora(tmp_path, capsys):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA"
    assert info["trainable_adapter_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("argv,message", [
    (["inspect", "/nonexistent/adapter"], "is not a directory"),
    (["merge", "--base", "{tmp}/base", "--adapter", "{tmp}", "--out", "{tmp}/out"], "has no adapter_config.json"),
    (["merge", "--base", "{tmp}/nothing", "--adapter", "{tmp}/adapter", "--out", "{tmp}/out"], "is not a directory"),
    (["export", "{tmp}/adapter", "--to", "lora", "{tmp}/out", "--base", "{tmp}/other"], "different base model"),
    (["merge", "--base", "{tmp}/base", "--adapter", "{tmp}/adapter", "--out", "{tmp}/full"], "is not empty"),
    (["export", "{tmp}/binonly", "--to", "lora", "{tmp}/out"], "pickle"),
])
def test_bad_inputs_give_one_line_errors_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    adapt(base, "lora_xs", "llama").save_pretrained(tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    (tmp_path / "binonly").mkdir()
    (tmp_path / "binonly" / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "binonly" / "adapter_model.bin").write_bytes(b"pickle")
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()  # drop the setup's progress bars
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    last = err.splitlines()[-1]  # earlier lines can only be progress bars of model loading
    assert last.startswith("leantune: error:") and message in last and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing half-written (no temp dirs left either)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory):
    """A LoRA-XS adapter briefly trained on the real MiniLM for sentiment (2 labels)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import leantune.adapters as la
    from recipes.common import load_minilm_classifier, minilm_path

    tmp = tmp_path_factory.mktemp("minilm")
    model, tokenizer = load_minilm_classifier()
    peft_model = get_peft_model(model, la.LoraXSConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    enc = tokenizer(["the screen was great", "the battery was not reliable"], return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        opt.zero_grad()
        peft_model(**enc, labels=torch.tensor([1, 0])).loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(tmp / "adapter")
    with torch.no_grad():
        expected = peft_model(**enc).logits
    return minilm_path(), tmp, enc, expected


def test_minilm_merge_and_export_round_trip(minilm_adapter):
    base_dir, tmp, enc, expected = minilm_adapter
    assert main(["merge", "--base", str(base_dir), "--adapter", str(tmp / "adapter"), "--out", str(tmp / "merged")]) == 0
    assert (tmp / "merged" / "tokenizer.json").is_file() and (tmp / "merged" / "vocab.txt").is_file()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp / "merged").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp / "merged")
    again = tokenizer(["the screen was great", "the battery was not reliable"], return_tensors="pt", padding=True)
    assert torch.equal(again["input_ids"], enc["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, expected, atol=1e-5, rtol=0)
    assert main(["export", str(tmp / "adapter"), "--to", "lora", str(tmp / "lora"), "--base", str(base_dir)]) == 0
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    lora = PeftModel.from_pretrained(base, tmp / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(**enc).logits, expected, atol=1e-5, rtol=0)


def test_inspect_counts_compacters_shared_rule_once_and_norms_apart(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    import leantune

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=128, d_ff=256, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, d_kv=32))
    model = get_peft_model(t5, leantune.CompacterConfig())
    counts = leantune.count_trainable(model)
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "BOTTLENECK" and info["adapted_modules"] == 8  # 2 per block, 4 blocks
    assert info["trainable_adapter_parameters"] == counts["adapter"]
    assert info["modules_to_save_parameters"] == counts["layer_norm"]
