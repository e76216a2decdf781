"""Another machine's valid SVD: singular pairs with other signs (a test and benchmark tool, shared by
``tests/machine.py`` and ``benchmarks/svd_signs.py``). With these signs a 1-ulp difference in the input flips about
half of the pairs — what LAPACK may do on another CPU — so a result that holds under them does not depend on the
machine's LAPACK."""

from __future__ import annotations

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
