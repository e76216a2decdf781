"""Import Triton if present; otherwise provide inert stand-ins so the torch references still import.

Kernel modules write ``from ._triton import jit, triton, tl`` and decorate with ``@jit`` (a lazily built
``triton.jit``, see :class:`LazyJit`). Without Triton
(e.g. macOS, Windows) the decorated kernels raise on launch, and :func:`leantune.kernels.dispatch.kernel_for`
never selects them because ``triton_available()`` is False.
"""

from __future__ import annotations

import functools
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


class LazyJit:
    """``@jit``: a ``triton.jit`` built at first launch, not at import.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so a kernel module imported before a test sets
    the variable would be stuck with the GPU compiler. Building on first use (and again if the flag changes)
    makes import order irrelevant. Helper ``@jit`` functions that a kernel calls are materialised into the
    module's globals first, where Triton looks them up by name.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._built: tuple[bool, Any] | None = None
        functools.update_wrapper(self, fn)

    def build(self) -> Any:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if self._built is None or self._built[0] != interpret:
            if interpret:  # triton.knobs caches the flag at import on recent versions
                knobs = getattr(triton, "knobs", None)
                if knobs is not None and hasattr(getattr(knobs, "runtime", None), "interpret"):
                    knobs.runtime.interpret = True
            globs = self.fn.__globals__
            for name, value in list(globs.items()):
                if isinstance(value, LazyJit) and value is not self:
                    globs[name] = value.build()
            self._built = (interpret, triton.jit(self.fn))
        return self._built[1]

    def __getitem__(self, grid: Any) -> Any:
        return self.build()[grid]


def jit(fn: Any) -> LazyJit:
    """Decorator used by every leantune kernel instead of ``triton.jit`` (see :class:`LazyJit`)."""
    return LazyJit(fn)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """16-bit tensors upcast to fp32 (what the kernels do after ``tl.load``); fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def dot_in_fp32(*tensors: torch.Tensor) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 first.

    The interpreter multiplies raw bf16 bit patterns in ``tl.dot`` (triton#11584), so it always upcasts; on a GPU
    16-bit tiles go to the tensor cores natively (fp32 accumulation) and fp32 inputs stay fp32.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return any(t.dtype not in (torch.float16, torch.bfloat16) for t in tensors)


__all__ = ["HAS_TRITON", "LazyJit", "compute_dtype", "jit", "dot_in_fp32", "next_power_of_2", "tl", "triton"]
