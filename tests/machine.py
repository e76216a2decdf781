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

from leantune.testing.svd_signs import scrambled_signs, scrambling  # noqa: F401  (re-exported for the tests)


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
