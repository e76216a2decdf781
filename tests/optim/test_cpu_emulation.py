"""Bitwise parity with galore-torch / fira must not depend on the CPU: rerun those tests as another CPU would run them.

``MKL_CBWR=COMPATIBLE`` makes MKL use its portable code path (it reproduced, on this Intel machine, the 1e-9 step-0
divergence seen on an AVX2-only AMD EPYC when the projector was a row-major copy of the column-major SVD slice);
``ATEN_CPU_CAPABILITY`` and ``MKL_ENABLE_INSTRUCTIONS`` select other ISA levels. ``.ci/run`` repeats the exactness and
kernel tests under all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARITY_TESTS = ["tests/optim/test_exactness.py", "tests/optim/test_optimizers.py::test_adafactor_matches_galore_torch",
                "tests/optim/test_dtypes_and_keys.py::test_fira_takes_the_fira_packages_groups_unchanged_and_matches_it_bitwise",
                "tests/kernels/test_optimizer_step.py::test_reference_matches_galore_torch"]


@pytest.mark.parametrize("env", ["MKL_CBWR=COMPATIBLE", "ATEN_CPU_CAPABILITY=default"])
def test_reference_parity_holds_on_emulated_cpus(env):
    pytest.importorskip("galore_torch")
    key, value = env.split("=")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS],
                            cwd=ROOT, env={**os.environ, key: value}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
