"""Fused Triton kernels, each beside its plain-torch reference (see ``dispatch`` for when each is used)."""

from .dispatch import force_triton, kernel_for, register_kernel, set_enabled, triton_available

__all__ = ["force_triton", "kernel_for", "register_kernel", "set_enabled", "triton_available"]
