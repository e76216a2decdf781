"""ComPEFT (``leantune compress``): the formula by hand, exact round trips of both encodings, the paper's bits per
entry, loadable outputs for peft and leantune adapters and full fine-tuning deltas, refusals that write nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import leantune
from leantune.cli import main as cli
from leantune.compress import COMPRESSED, compress_full, compression_info, decompress_adapter, decompress_full
from leantune.compress.compeft import (
    decode,
    encode,
    golomb_decode,
    golomb_encode,
    golomb_parameter,
    stored_bits,
    ternarize,
)
from leantune.integrations.checkpoints import LeanTuneError


def test_ternarize_by_hand():
    tau = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 0.0, 1.0, -1.0, 0.3, 0.05], dtype=torch.float64)
    unit = ternarize(tau, density=0.3, alpha=2.0)
    sigma = float(np.std(tau.numpy(), ddof=1))  # of the whole, un-pruned τ, unbiased
    assert unit.positions.tolist() == [1, 3, 6]  # the ⌊0.3·10⌋ = 3 largest |τ|; 1.0 beats −1.0 by position
    assert unit.signs.tolist() == [False, True, True]
    assert unit.scale == pytest.approx(2.0 * sigma, rel=1e-7)
    expected = torch.zeros(10, dtype=torch.float64)
    expected[[1, 3, 6]] = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64) * unit.scale
    assert torch.equal(unit.dense(torch.float64), expected)
    auto = ternarize(tau, density=0.3)  # α·σ = mean |τ| of the kept entries
    assert auto.scale == pytest.approx((2.0 + 3.0 + 1.0) / 3, rel=1e-7)


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.9])
def test_golomb_round_trip_and_bits_per_entry(density):
    rng = np.random.default_rng(0)
    d = 200_000
    positions = np.sort(rng.choice(d, int(density * d), replace=False))
    b = golomb_parameter(density)
    data, nbits = golomb_encode(positions, b)
    assert np.array_equal(golomb_decode(data, nbits, len(positions), b), positions)
    # STC's expected bits per nonzero (positions + 1 sign bit), spec: 6.786 at p = 0.05, 5.756 at 0.1, 4.694 at 0.2
    expected = b + 1 / (1 - (1 - density) ** (2**b)) + 1
    assert (nbits + len(positions)) / len(positions) == pytest.approx(expected, rel=0.02)


def test_paper_ratios_against_fp16():
    rng = np.random.default_rng(1)
    tau = torch.from_numpy(rng.standard_normal(400_000))
    for density, ratio in [(0.05, 47.2), (0.1, 27.8), (0.2, 17.0)]:
        unit = ternarize(tau, density)
        coded = encode(unit, "golomb", density)
        assert 16 * unit.numel / stored_bits(coded) == pytest.approx(ratio, rel=0.03)
        for encoding in ("golomb", "bitmask"):
            stored = encode(unit, encoding, density)
            back = decode(stored, unit.numel, len(unit.positions), unit.scale)
            assert torch.equal(back.dense(), unit.dense())


def _lora_adapter(tmp_path, **lora):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("encoding", ["golomb", "bitmask"])
def test_compressed_lora_loads_and_equals_the_ternary_update(tmp_path, scope, encoding):
    adapter = _lora_adapter(tmp_path, modules_to_save=["2"])
    info = leantune.compress_adapter(adapter, tmp_path / "small", density=0.2, scope=scope, encoding=encoding)
    original = load_file(str(adapter / "adapter_model.safetensors"))
    compressed = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    lora_keys = sorted(k for k in original if "lora_" in k)
    if scope == "tensor":
        for key in lora_keys:  # each tensor: its own top 20% and σ
            unit = ternarize(original[key], 0.2)
            assert torch.equal(compressed[key], unit.dense(torch.float64).view(original[key].shape).float())
    else:
        flat = torch.cat([compressed[k].reshape(-1) for k in lora_keys])
        assert int((flat != 0).sum()) == math.floor(0.2 * flat.numel())
        assert len(set(flat[flat != 0].abs().tolist())) == 1  # one scale for the whole adapter
    heads = [k for k in original if "lora_" not in k]  # the modules_to_save head
    assert heads and all(torch.equal(original[k], compressed[k]) for k in heads)  # kept exactly
    assert set(info["kept_tensors"]) == set(heads)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    PeftModel.from_pretrained(base, tmp_path / "small")  # a normal adapter folder
    rebuilt = decompress_adapter(tmp_path / "small", tmp_path / "again")  # from compeft.safetensors alone
    again = load_file(str(rebuilt / "adapter_model.safetensors"))
    assert again.keys() == compressed.keys() and all(torch.equal(again[k], compressed[k]) for k in again)
    assert info["ratio"] > 5 and compression_info(tmp_path / "small")["ratio"] == info["ratio"]


def test_frozen_and_dora_tensors_are_kept(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = get_peft_model(base, leantune.LoraXSConfig(r=4, target_modules=["0"]))
    model.save_pretrained(tmp_path / "xs")
    info = leantune.compress_adapter(tmp_path / "xs", tmp_path / "xs_small", density=0.25)
    original = load_file(str(tmp_path / "xs" / "adapter_model.safetensors"))
    small = load_file(str(tmp_path / "xs_small" / "adapter_model.safetensors"))
    for key, reason in info["kept_tensors"].items():
        assert "loraxs_R" not in key and torch.equal(original[key], small[key]), key
    assert any("loraxs_R" in k for k in original) and info["compressed_tensors"] == 1
    dora = _lora_adapter(tmp_path / "d", use_dora=True)
    info = leantune.compress_adapter(dora, tmp_path / "dora_small", density=0.5)
    assert any("lora_magnitude_vector" in k and "DoRA" in why for k, why in info["kept_tensors"].items())


def test_full_fine_tuning_delta(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "base")
    tuned = BertForSequenceClassification(config)
    tuned.bert.load_state_dict(BertModel.from_pretrained(tmp_path / "base").state_dict())
    with torch.no_grad():
        for p in tuned.bert.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    info = compress_full(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", density=0.1)
    assert any(k.startswith("classifier") for k in info["kept_tensors"])  # a new head: no task vector
    out = BertForSequenceClassification.from_pretrained(tmp_path / "out")
    base_sd = BertModel.from_pretrained(tmp_path / "base").state_dict()
    delta = out.bert.encoder.layer[0].output.dense.weight - base_sd["encoder.layer.0.output.dense.weight"]
    assert 0.05 < float((delta != 0).float().mean()) < 0.15  # ~10% kept (up to fp32 rounding of base + τ̃)
    again = decompress_full(tmp_path / "base", tmp_path / "out", tmp_path / "again")
    assert torch.equal(load_file(str(again / "model.safetensors"))["bert.encoder.layer.0.output.dense.weight"],
                       load_file(str(tmp_path / "out" / "model.safetensors"))["bert.encoder.layer.0.output.dense.weight"])


def test_bad_input_writes_nothing(tmp_path, capsys):
    adapter = _lora_adapter(tmp_path)
    for density in (0, 1.5, "0.1"):
        with pytest.raises(LeanTuneError, match="density"):
            leantune.compress_adapter(adapter, tmp_path / "x", density=density)
    with pytest.raises(LeanTuneError, match="keeps no entry"):
        leantune.compress_adapter(adapter, tmp_path / "x", density=1e-9)
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(LeanTuneError, match="truncated|ends before"):
        leantune.compress_adapter(adapter, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert cli(["compress", str(adapter), str(tmp_path / "x")]) == 2
    assert cli(["compress", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "leantune: error:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_and_inspect(tmp_path, capsys):
    adapter = _lora_adapter(tmp_path)
    assert cli(["compress", str(adapter), str(tmp_path / "c"), "--density", "0.1"]) == 0
    assert "x vs fp16" in capsys.readouterr().out
    assert cli(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "compressed update" in out and "density 0.1" in out
    assert (tmp_path / "c" / COMPRESSED).is_file()


def test_bf16_adapter_compresses_in_its_dtype(tmp_path):
    """A bf16-trained adapter (saved in bf16): each compressed tensor is the float64 ternary form of the bf16 values,
    rounded back to bf16, through compress_adapter and tune_alpha alike; the folder loads onto a bf16 base."""
    from leantune.compress import tune_alpha

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False),
                           autocast_adapter_dtype=False)
    model.save_pretrained(tmp_path / "adapter")
    original = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in original.values()} == {torch.bfloat16}
    tune_alpha(tmp_path / "adapter", tmp_path / "small", lambda f: 0.0, density=0.2, alphas=(2.0,), progress=False)
    compressed = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    for key, value in original.items():
        unit = ternarize(value.double(), 0.2, alpha=2.0)
        assert compressed[key].dtype == torch.bfloat16
        assert torch.equal(compressed[key], unit.dense(torch.float64).view(value.shape).to(torch.bfloat16))
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "small")
    assert loaded(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_tune_alpha_keeps_the_best_scoring_candidate(tmp_path):
    """α chosen on "validation": the score here is minus the squared distance of the compressed adapter to the
    original one, whose value for each α is computed by hand below from the kept set and σ (the minimiser is the
    auto rule α* = mean |τ_kept| / σ), so the best candidate by that error must win; every candidate is scored."""
    from leantune.compress import tune_alpha

    adapter = _lora_adapter(tmp_path)
    original = load_file(str(adapter / "adapter_model.safetensors"))
    seen = []

    def score(folder):
        seen.append(folder.name)
        got = load_file(str(folder / "adapter_model.safetensors"))
        return -sum(float((got[k].double() - original[k].double()).square().sum()) for k in original)

    alphas = (0.5, 1.0, 2.0, 3.0)
    info = tune_alpha(adapter, tmp_path / "best", score, density=0.2, alphas=alphas, scope="global", progress=False)
    assert len(seen) == len(alphas) and set(info["scores"]) == {str(a) for a in alphas}
    # by hand: the global top 20% of |τ| over all (sorted) keys, σ of the whole τ, error of each α
    keys = sorted(original)
    tau = torch.cat([original[k].double().reshape(-1) for k in keys])
    k = math.floor(0.2 * tau.numel())
    kept = tau.abs().sort(descending=True).values[:k]
    sigma = float(tau.std())
    errors = {a: float(((kept - a * sigma) ** 2).sum() + (tau.square().sum() - kept.square().sum())) for a in alphas}
    assert info["alpha"] == min(errors, key=errors.get)
    for a in alphas:
        assert info["scores"][str(a)] == pytest.approx(-errors[a], rel=1e-5)
    chosen = load_file(str(tmp_path / "best" / "adapter_model.safetensors"))
    flat = torch.cat([chosen[key].double().reshape(-1) for key in keys])
    assert flat[flat != 0].abs().unique().tolist() == pytest.approx([info["alpha"] * sigma], rel=1e-6)
    assert (tmp_path / "best" / COMPRESSED).is_file()
    # a tie keeps the first candidate; numpy and 0-d tensor scores are numbers; no candidate folder is left behind
    tie = tune_alpha(adapter, tmp_path / "tie", lambda f: np.float32(1.0), alphas=(2, 1.0), progress=False)
    assert tie["alpha"] == 2.0 and tie["scores"] == {"2.0": 1.0, "1.0": 1.0}
    single = tune_alpha(adapter, tmp_path / "t", lambda f: torch.tensor(0.5), alphas=[1.0], progress=False)
    assert single["alpha"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "best", "t", "tie"]
    # a failing or non-numeric score writes nothing
    def broken(folder):
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        tune_alpha(adapter, tmp_path / "none", broken, progress=False)
    for bad in (lambda f: float("nan"), lambda f: "high", lambda f: True):
        with pytest.raises(LeanTuneError, match="finite number"):
            tune_alpha(adapter, tmp_path / "none", bad, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "best", "t", "tie"]
    for alphas in ((), "auto", (0.5, -1.0), (1, 1.0), iter(())):
        with pytest.raises(LeanTuneError, match="alpha"):
            tune_alpha(adapter, tmp_path / "none", score, alphas=alphas, progress=False)
    # an output folder that could not be written is refused before any candidate is scored
    seen.clear()
    with pytest.raises(LeanTuneError, match="not empty"):
        tune_alpha(adapter, tmp_path / "best", score, alphas=(1.0, 2.0), progress=False)
    assert not seen
