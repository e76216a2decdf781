"""Kernel tests run the Triton kernels in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before ``@triton.jit`` runs, i.e. before anything imports a kernel module.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Relative tolerance on max|actual − expected| / max|expected|, per dtype of the tensors compared.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, factor: float = 1.0):
    """Max-relative comparison with a per-dtype tolerance; also catches NaN/inf mismatches and shape errors."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), "NaN/inf pattern differs"
    scale = e.abs().max().clamp_min(1e-12)
    err = ((a - e).abs().max() / scale).item()
    tol = REL_TOL[dtype or expected.dtype] * factor
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_on():
    from leantune.kernels import force_triton

    with force_triton():
        yield
