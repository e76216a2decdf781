"""One dispatch rule for every leantune kernel.

CUDA tensors and an importable Triton -> the Triton kernel; anything else -> the plain-torch reference.
The Triton interpreter (``TRITON_INTERPRET=1`` with CPU tensors) is used only when a test asks for it with
:func:`force_triton`, so users on a CPU always get the reference path (and pay nothing for leantune kernels).
On CPU the 2-bit activation reference and the MS-norm backward run their inner loops as small C kernels compiled
on first use (:mod:`leantune.kernels.cpu_native`; their torch ops remain the fallback).

Each op's one autograd function (``activations``, ``norms``, ``gated_mlp``, ``fused_mlp``, ``lora_linear``) and the
fused optimizer step ask ``kernel_for(name, *tensors)`` and run their torch reference when it returns ``None``. The
registered value is the op's Triton launcher.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Callable, Iterator

import torch

_KERNELS: dict[str, Callable] = {}
_DISABLED: set[str] = set()
_ENABLED: bool | None = None  # None: on for CUDA tensors, off otherwise
_FORCE_INTERPRETER = False


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported on this machine."""
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton kernels then run in numpy, on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def register_kernel(name: str, fn: Callable) -> None:
    """Register the Triton-backed callable for kernel ``name`` (done by each kernel module at import)."""
    _KERNELS[name] = fn


def registered_kernels() -> list[str]:
    """Names of all registered kernels (after ``import leantune.kernels``)."""
    return sorted(_KERNELS)


def set_enabled(enabled: bool | None, disable: tuple[str, ...] | list[str] = ()) -> None:
    """Globally switch kernels on/off (``None`` restores the default) and turn off single kernels by name."""
    global _ENABLED
    _ENABLED = enabled
    _DISABLED.clear()
    _DISABLED.update(disable)


@contextlib.contextmanager
def force_triton() -> Iterator[None]:
    """Tests only: route CPU tensors through Triton kernels (needs ``TRITON_INTERPRET=1`` set before import)."""
    global _FORCE_INTERPRETER
    if not interpreter_active():
        raise RuntimeError("force_triton() needs TRITON_INTERPRET=1 set before triton is imported")
    previous, _FORCE_INTERPRETER = _FORCE_INTERPRETER, True
    try:
        yield
    finally:
        _FORCE_INTERPRETER = previous


def kernel_for(name: str, *tensors: torch.Tensor) -> Callable | None:
    """The Triton callable for ``name`` if the dispatch rule picks Triton for these tensors, else ``None``."""
    if name in _DISABLED or _ENABLED is False:
        return None
    fn = _KERNELS.get(name)
    if fn is None:
        return None
    if _FORCE_INTERPRETER:
        return fn
    if tensors and all(t.is_cuda for t in tensors) and triton_available():
        return fn
    return None
