"""Import Triton if present; otherwise provide inert stand-ins so the torch references still import.

Kernel modules write ``from ._triton import triton, tl`` and decorate with ``@triton.jit``. Without Triton
(e.g. macOS, Windows) the decorated kernels raise on launch, and :func:`leantune.kernels.dispatch.kernel_for`
never selects them because ``triton_available()`` is False.

``TRITON_INTERPRET=1`` must be set before *triton itself* is imported (its own ``tl.sigmoid`` etc. are jitted at
import), so test runs set it before anything imports ``leantune.kernels``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _Missing:
        """Stands in for ``triton`` / ``triton.language``: attributes resolve, calls fail clearly."""

        constexpr = Any

        def __getattr__(self, name: str) -> "_Missing":
            return self

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:  # used as @triton.jit
                return _Missing()
            raise RuntimeError("Triton is not installed; leantune falls back to its torch references")

        def __getitem__(self, item: Any) -> "_Missing":
            return self

    triton = _Missing()  # type: ignore[assignment]
    tl = _Missing()  # type: ignore[assignment]


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_in_fp32(*tensors: torch.Tensor) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 first.

    The interpreter multiplies raw bf16 bit patterns in ``tl.dot`` (triton#11584), so it always upcasts; on a GPU
    16-bit tiles go to the tensor cores natively (fp32 accumulation) and fp32 inputs stay fp32.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return any(t.dtype not in (torch.float16, torch.bfloat16) for t in tensors)


__all__ = ["HAS_TRITON", "dot_in_fp32", "next_power_of_2", "tl", "triton"]
