"""`leantune profile` subcommand on a config-only model directory."""

from __future__ import annotations

import transformers as T

from leantune.memory.cli import main, memory_config_from_string


def test_profile_cli_on_config_dir(tmp_path, capsys):
    T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64).save_pretrained(tmp_path)
    assert main(["profile", str(tmp_path), "--seq-len", "8", "--lora-rank", "2", "--memory", "all", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "### eager" in out and "### leantune.memory" in out and "saved for backward" in out
    assert "fused_gated_mlp=1" in out


def test_memory_config_parsing():
    assert memory_config_from_string("none") is None
    config = memory_config_from_string("ms_norms,velora")
    assert config.ms_norms and config.velora and not config.fused_gated_mlp
    try:
        memory_config_from_string("nonsense")
    except ValueError as err:
        assert "nonsense" in str(err)
    else:
        raise AssertionError("expected ValueError")
