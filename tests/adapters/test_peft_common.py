"""peft's own common test suite over every leantune tuner.

peft tests each of its tuners with the shared checks of ``tests/testing_common.py::PeftCommonTester`` (save/load,
several adapters, delete, training, merge, safe merge, idempotent merge, unload, disable, dtype handling ...), driven
for custom models by ``tests/test_custom_models.py`` on small models such as its ``MLP`` (``lin0``, ``lin1``). The
test files are not in peft's wheel: they are taken from the source distribution of the installed version, fetched
once with ``pip download --no-binary :all: peft==<version>`` into ``$LEANTUNE_CACHE_DIR`` (default
``~/.cache/leantune``); without network or pip the module is skipped, saying so.

The test functions of ``TestPeftCustomModel`` that are generic over the method are reused unchanged, re-parametrized
over leantune's configs (so peft's ~8,000 own cases are not collected); the ``PeftCommonTester`` checks it does not
call for custom models are called here. What does not apply is skipped with a one-line reason (``NOT_APPLICABLE``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft
import pytest
import torch

import leantune


def _peft_tests_dir() -> Path | None:
    """peft's ``tests`` folder for the installed version, from the cache or fetched into it; None if unavailable."""
    root = Path(os.environ.get("LEANTUNE_CACHE_DIR") or Path.home() / ".cache" / "leantune")
    target = root / "peft-tests" / peft.__version__
    if (target / "testing_common.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                            f"peft=={peft.__version__}", "-d", tmp], check=True, capture_output=True, timeout=300)
            archive = next(Path(tmp).glob("peft-*.tar.gz"))
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
                tar.extractall(tmp, members=members, filter="data")
            source = next(Path(tmp).glob("peft-*/tests"))
        except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError):
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    return target


TESTS_DIR = _peft_tests_dir()
if TESTS_DIR is None:
    pytest.skip(f"peft {peft.__version__}'s test sources could not be fetched (pip download --no-binary :all: "
                f"peft=={peft.__version__} failed: no network or no pip)", allow_module_level=True)

# peft's tests folder has no __init__.py but uses relative imports: load it as a package of its own name (ours is
# also called "tests"); diffusers is imported by testing_common only for an isinstance check.
if "diffusers" not in sys.modules:
    sys.modules["diffusers"] = types.SimpleNamespace(StableDiffusionPipeline=type("StableDiffusionPipeline", (), {}))
PACKAGE = "peft_upstream_tests"
sys.modules.setdefault(PACKAGE, types.ModuleType(PACKAGE)).__path__ = [str(TESTS_DIR)]
common = importlib.import_module(f"{PACKAGE}.testing_common")
utils = importlib.import_module(f"{PACKAGE}.testing_utils")
custom = importlib.import_module(f"{PACKAGE}.test_custom_models")

TARGET = {"target_modules": ["lin0"]}
CASES = [  # (test name, model id, config class, config kwargs) as peft's TEST_CASES
    ("MLP LoRA-XS", "MLP", leantune.LoraXSConfig, {**TARGET, "r": 2, "r_init_std": 0.0}),  # exact identity at init
    ("MLP LoRA-SB", "MLP", leantune.LoraSBConfig, {**TARGET, "r": 2, "init_weights": False}),  # no data here
    ("MLP ALLoRA", "MLP", leantune.ALLoRAConfig, {**TARGET, "r": 2}),
    ("MLP DyLoRA", "MLP", leantune.DyLoRAConfig, {**TARGET, "r": 2}),
    ("MLP NOLA", "MLP", leantune.NolaConfig, {**TARGET, "r": 2, "num_basis_A": 8, "num_basis_B": 8}),
    ("MLP Bottleneck", "MLP", leantune.BottleneckConfig, {**TARGET, "reduction_factor": 2, "init_weights": "zeros_up"}),
    # phm_init_range 0.1 (paper: 1e-4): with zeros_up a 1e-4 rule moves the adapter less than the 1e-4 tolerance of
    # test_only_params_are_updated in its three steps
    ("MLP Compacter", "MLP", leantune.CompacterConfig,
     {**TARGET, "reduction_factor": 5, "init_weights": "zeros_up", "phm_init_range": 0.1}),
    ("MLP Compacter++", "MLP", leantune.CompacterPlusPlusConfig,
     {**TARGET, "reduction_factor": 5, "init_weights": "zeros_up", "phm_init_range": 0.1}),
    ("MLP L4Q", "MLP", leantune.L4QConfig, {**TARGET, "r": 2, "group_size": 5, "bits": 8}),
]
NONLINEAR = (leantune.BottleneckConfig,)  # Compacter(++) included: y + U f(D y) has no weight form, merge raises
PARAMS = "test_name, model_id, config_cls, config_kwargs"

_peft_merge_skip = common._skip_if_merging_not_supported


def _skip_if_merging_not_supported(model_id, config_cls, config_kwargs):
    """peft's helper knows only peft's classes; the bottleneck family is nonlinear and refuses merging."""
    if issubclass(config_cls, NONLINEAR):
        pytest.skip(f"{config_cls.__name__} is nonlinear (y + U f(D y)) and cannot be merged")
    _peft_merge_skip(model_id, config_cls, config_kwargs)


common._skip_if_merging_not_supported = custom._skip_if_merging_not_supported = _skip_if_merging_not_supported


def not_applicable(test: str, config_cls) -> str | None:
    """Why a common test does not apply to a method (one line), None if it must pass."""
    if test == "test_disable_adapter_common":
        return "_test_disable_adapter calls model.generate, which a custom MLP does not have"
    if test == "test_disable_adapter_with_bias_warns":
        return "about LoRA's bias= option, which leantune tuners do not have (bias='none' only)"
    if config_cls is leantune.LoraSBConfig and test in ("test_disable_adapters", "test_disable_adapters_with_merging"):
        return "needs an identity adapter at init; LoRA-SB's starts at the first step's update (needs data)"
    if config_cls is leantune.L4QConfig and test in ("test_disable_adapters", "test_disable_adapters_with_merging"):
        return "needs an identity adapter at init; L4Q's starts as the quantized base Q(W0) ≠ W0 (by design)"
    if config_cls is leantune.L4QConfig and test == "test_merge_layers_multi":
        return ("merges two adapters into one weight; two L4Q adapters are two quantizations of W0 (refused with a "
                "ValueError; merging one is tested by test_merge_layers*)")
    return None


def _reuse(fn):
    """peft's test function, unchanged, re-parametrized over CASES (its dtype/autocast parametrizations kept)."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "pytestmark"})
    copy.pytestmark = [m for m in getattr(fn, "pytestmark", []) if not (m.name == "parametrize" and m.args[0] == PARAMS)]
    return pytest.mark.parametrize(PARAMS, CASES, ids=[c[0] for c in CASES])(copy)


REUSED = [  # every TestPeftCustomModel test parametrized over TEST_CASES, i.e. generic over the PEFT method
    "test_attributes_parametrized", "test_adapter_name", "test_save_pretrained",
    "test_save_load_roundtrip_direct_injection", "test_save_pretrained_pickle",
    "test_save_pretrained_adapter_name_substring", "test_load_model_low_cpu_mem_usage",
    "test_from_pretrained_config_construction", "test_load_multiple_adapters", "test_merge_layers",
    "test_merge_layers_fp16", "test_merge_layers_is_idempotent", "test_merge_layers_is_deterministic_in_train_mode",
    "test_safe_merge", "test_training_custom_models", "test_inference_safetensors", "test_peft_model_device_map",
    "test_in_features_out_features_exposed", "test_forward_output_finite", "test_forward_float16",
    "test_forward_bfloat16", "test_forward_float16_no_autocast", "test_forward_bfloat16_no_autocast",
    "test_adapter_dtype_autocast", "test_only_params_are_updated", "test_save_load_roundtrip",
    "test_parameters_after_loading_model", "test_disable_adapters", "test_disable_adapters_with_merging",
    "test_disable_adapter_with_bias_warns", "test_active_adapter",
    "test_disable_adapters_exiting_context_restores_previous_state", "test_disable_adapter_is_reentrant",
    "test_disable_adapters_exiting_context_irregular_state", "test_delete_adapter",
    "test_delete_merged_adapter_raises_without_mutation", "test_delete_merged_adapter_only_rejects_the_merged_one",
    "test_delete_adapter_properly_cleans_up_after_itself", "test_delete_inactive_adapter",
    "test_delete_unknown_adapter_raises", "test_adding_multiple_adapters_with_bias_raises",
    "test_get_base_model_state_dict",
]


class _EvalModels(custom.MockTransformerWrapper):
    """As peft's wrapper, in eval mode: _test_unload_adapter compares logits, and the MLP has Dropout(0.5)."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        return super().from_pretrained(model_id, dtype=dtype).eval()


class TestLeanTuneCommon(common.PeftCommonTester):
    transformers_class = custom.MockTransformerWrapper
    torch_device = "cpu"

    @pytest.fixture(autouse=True)
    def _applicable(self, request):
        reason = not_applicable(request.node.originalname, request.node.callspec.params.get("config_cls"))
        if reason:
            pytest.skip(reason)

    def prepare_inputs_for_testing(self):
        return {"X": torch.arange(90).view(9, 10).to(self.torch_device)}

    for _name in REUSED:
        locals()[_name] = _reuse(getattr(custom.TestPeftCustomModel, _name))
    del _name

    # PeftCommonTester checks that peft runs for its decoder models but not for custom models
    @pytest.mark.parametrize(PARAMS, CASES, ids=[c[0] for c in CASES])
    def test_unload_adapter(self, test_name, model_id, config_cls, config_kwargs):
        self.transformers_class = _EvalModels
        self._test_unload_adapter(model_id, config_cls, utils.set_init_weights_false(config_cls, config_kwargs))

    @pytest.mark.parametrize(PARAMS, CASES, ids=[c[0] for c in CASES])
    def test_disable_adapter_common(self, test_name, model_id, config_cls, config_kwargs):
        self._test_disable_adapter(model_id, config_cls, utils.set_init_weights_false(config_cls, config_kwargs))

    @pytest.mark.parametrize(PARAMS, CASES, ids=[c[0] for c in CASES])
    @pytest.mark.parametrize("safe_serialization", [True, False])
    def test_save_pretrained_selected_adapters(self, test_name, model_id, config_cls, config_kwargs,
                                               safe_serialization):
        self._test_save_pretrained_selected_adapters(
            model_id, config_cls, utils.set_init_weights_false(config_cls, config_kwargs), safe_serialization)

    @pytest.mark.parametrize(PARAMS, CASES, ids=[c[0] for c in CASES])
    def test_merge_layers_multi(self, test_name, model_id, config_cls, config_kwargs):
        self._test_merge_layers_multi(model_id, config_cls, utils.set_init_weights_false(config_cls, config_kwargs))

    @pytest.mark.parametrize(PARAMS, CASES, ids=[c[0] for c in CASES])
    def test_merge_layers_nan(self, test_name, model_id, config_cls, config_kwargs):
        self._test_merge_layers_nan(model_id, config_cls, utils.set_init_weights_false(config_cls, config_kwargs))

    @pytest.mark.parametrize(PARAMS, CASES, ids=[c[0] for c in CASES])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_add_adapter_no_autocast_adapter_dtype(self, test_name, model_id, config_cls, config_kwargs, dtype):
        self._test_add_adapter_no_autocast_adapter_dtype(model_id, config_cls, config_kwargs, dtype=dtype)
