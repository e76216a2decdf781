"""Project-wide test setup: offline Hugging Face, small thread count, deterministic seeds."""

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton compiles its own library functions at import time, so the interpreter flag must be set before
# anything imports triton. Harmless elsewhere: without force_triton() CPU tensors use the torch references.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.machine import emulate_from_env  # noqa: E402

emulate_from_env()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_finish(session) -> None:
    """Move everything imported and collected so far (torch, transformers, peft, ~2,500 test items) out of the garbage
    collector's view. accelerate calls ``gc.collect()`` at the end of every ``Trainer.train()``; over that heap one
    collection took ~0.3 s, i.e. ~0.7 s of each support-matrix cell. Objects created later are collected as usual."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config) -> None:
    """Hand the frozen objects back before exit: nanobind (Triton's bindings) reports every binding still alive at
    interpreter shutdown as a leak."""
    gc.unfreeze()
    gc.collect()
