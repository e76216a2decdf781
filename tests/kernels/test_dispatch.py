"""The dispatch rule: CPU users always get the torch reference; Triton only for CUDA tensors or forced in tests."""

import pytest
import torch

import leantune.kernels as K
from leantune.kernels import dispatch


def test_all_kernels_are_registered():
    assert set(K.registered_kernels()) >= {
        "regelu2", "resilu2", "ms_rmsnorm", "ms_layernorm", "gated_mlp", "gated_activation", "lora_linear",
        "galore_adam_step",
    }  # fmt: skip


def test_cpu_tensors_get_reference_path_without_force():
    x = torch.randn(4, 8)
    for name in K.registered_kernels():
        assert K.kernel_for(name, x) is None, name


def test_force_triton_selects_kernels_and_switches_off_by_name():
    x = torch.randn(4, 8)
    with K.force_triton():
        assert all(K.kernel_for(n, x) is not None for n in K.registered_kernels())
        K.set_enabled(None, disable=("ms_rmsnorm",))
        try:
            assert K.kernel_for("ms_rmsnorm", x) is None
            assert K.kernel_for("lora_linear", x) is not None
            K.set_enabled(False)
            assert K.kernel_for("lora_linear", x) is None
        finally:
            K.set_enabled(None)
    assert K.kernel_for("lora_linear", x) is None


def test_force_triton_requires_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with dispatch.force_triton():
            pass


def test_cpu_public_functions_do_not_launch_triton(monkeypatch):
    """Without force_triton the public ops never touch a Triton launcher on CPU (they would raise here)."""
    from leantune.kernels import activations, gated_mlp, lora_linear, norms

    def boom(*args, **kwargs):
        raise AssertionError("Triton launched on the CPU path")

    for mod, fn in [
        (activations, "triton_approx_activation"), (norms, "triton_ms_norm"),
        (gated_mlp, "triton_gated_mlp"), (lora_linear, "triton_lora_forward"),
    ]:  # fmt: skip
        monkeypatch.setattr(mod, fn, boom)
    x = torch.randn(3, 8, requires_grad=True)
    K.regelu2(x).sum().backward()
    K.ms_rmsnorm(x).sum().backward()
    K.gated_activation(x, x).sum().backward()
    K.fused_lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 2.0).sum().backward()
