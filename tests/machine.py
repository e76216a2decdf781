"""How the suite emulates another user's machine (set by ``.ci/run``; off by default).

``LEANTUNE_TEST_THREADS=N``: torch uses N threads in the test process and in every spawned worker (a GEMM's rounding
can depend on how it is split over threads).

``LEANTUNE_TEST_SVD_SIGNS=scramble``: every sign-oriented SVD of leantune's optimizers (``leantune.optim.svd``)
returns its singular pairs with signs drawn from the last bits of its input — a valid SVD, as LAPACK could return
it, but one where a 1-ulp difference in the input flips about half of the pairs (MKL does this by luck on some
machines; here it is certain). A result that holds with it does not depend on which signs the machine's LAPACK picks.
"""

from __future__ import annotations

import os

import torch


def scrambled_signs(A: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U D, D Vh)`` with D = diag(±1) seeded by the sum of A's raw bits (any change of one bit changes it)."""
    raw = A.detach().contiguous()
    bits = raw.view(torch.int64 if raw.element_size() == 8 else torch.int32 if raw.element_size() == 4 else torch.int16)
    seed = int(bits.to(torch.int64).sum()) % (2**63 - 1)
    gen = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (U.shape[1],), generator=gen) * 2 - 1).to(device=U.device, dtype=U.dtype)
    return U * signs[None, :], Vh * signs[:, None]


def scrambling(svd):
    """``svd`` (``torch.linalg.svd``) returning :func:`scrambled_signs` factors: for the raw-sign paths
    (``svd_signs="lapack"``, the reference switches), which bypass ``leantune.optim.svd.sign_hook``."""
    def scrambled(A, full_matrices=True, **kwargs):
        U, S, Vh = svd(A, full_matrices=full_matrices, **kwargs)
        U, Vh = scrambled_signs(A, U, Vh)
        return U, S, Vh
    return scrambled


def emulate_from_env() -> None:
    """Apply the ``LEANTUNE_TEST_*`` settings of the environment to this process."""
    threads = os.environ.get("LEANTUNE_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    signs = os.environ.get("LEANTUNE_TEST_SVD_SIGNS", "")
    if signs not in ("", "lapack", "scramble"):
        raise ValueError(f"LEANTUNE_TEST_SVD_SIGNS={signs!r}: expected 'lapack' (default) or 'scramble'")
    if signs == "scramble":
        import leantune.optim.svd

        leantune.optim.svd.sign_hook = scrambled_signs
