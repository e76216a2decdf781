"""leantune's tuner types are known to peft, and unsupported peft versions are refused clearly."""

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import leantune.adapters as la
from leantune.adapters.registration import LeanTuneType, check_peft_version, register_tuner


def test_every_leantune_type_is_registered_with_peft():
    for peft_type in (LeanTuneType.LORA_XS, LeanTuneType.LORA_SB, LeanTuneType.ALLORA, LeanTuneType.DYLORA):
        assert peft_type in PEFT_TYPE_TO_CONFIG_MAPPING and peft_type in PEFT_TYPE_TO_TUNER_MAPPING
        assert "LORA_XS" in PEFT_TYPE_TO_CONFIG_MAPPING  # the plain string saved in adapter_config.json works too


def test_config_round_trips_through_json(tmp_path):
    config = la.DyLoRAConfig(r=6, r_min=2, lora_alpha=3.0, target_modules=["q_proj"], eval_rank=4)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is la.DyLoRAConfig
    assert (loaded.r, loaded.r_min, loaded.lora_alpha, loaded.eval_rank) == (6, 2, 3.0, 4)
    assert loaded.target_modules == {"q_proj"}


@pytest.mark.parametrize("version", ["0.20.0", "0.22.0", "1.0.0"])
def test_unsupported_peft_versions_are_refused_with_the_fix(version):
    with pytest.raises(ImportError, match=r"pip install 'peft>=0.21.0,<0.22.0'"):
        check_peft_version(version)


def test_supported_versions_pass():
    check_peft_version("0.21.0")
    check_peft_version("0.21.9")


def test_a_prefix_clash_is_refused():
    class Clashing:
        prefix = "loraxs_"

    with pytest.raises(KeyError, match="already used"):
        register_tuner(LeanTuneType.ALLORA, la.ALLoRAConfig, Clashing)
