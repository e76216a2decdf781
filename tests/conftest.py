"""Project-wide test setup: offline Hugging Face, small thread count, deterministic seeds."""

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
