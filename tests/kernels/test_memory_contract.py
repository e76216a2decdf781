"""The one autograd function per op, used by leantune.memory: its Triton path equals its torch path."""

import pytest
import torch
from torch import nn

import leantune.kernels as K
from leantune.kernels import activations as memory_acts
from leantune.kernels import fused_mlp as memory_mlp
from leantune.kernels import norms as memory_norms

from .conftest import assert_close


def _run(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "name,fn",
    [
        ("regelu2", lambda x: memory_acts.ApproxActivationFunction.apply(x, "regelu2", "none")),
        ("regelu2", lambda x: memory_acts.ApproxActivationFunction.apply(x, "regelu2", "tanh")),
        ("resilu2", lambda x: memory_acts.ApproxActivationFunction.apply(x, "resilu2")),
        ("ms_rmsnorm", lambda x: memory_norms.MSNormFunction.apply(x, 1e-6, "rmsnorm")),
        ("ms_layernorm", lambda x: memory_norms.MSNormFunction.apply(x, 1e-5, "layernorm")),
        ("ms_layernorm", lambda x: torch.stack(memory_norms.ms_norm_affine(  # post-norm: (y, γ ⊙ y + β)
            x, 1e-5, "layernorm", torch.linspace(0.5, 1.5, 37).to(x.dtype), torch.linspace(-1, 1, 37).to(x.dtype)))),
    ],
)
def test_memory_functions_with_kernels_equal_their_torch_path(name, fn, dtype):
    x = (torch.randn(3, 5, 37) * 3).to(dtype)
    ref_out, ref_grads = _run(fn, x)
    with K.force_triton():
        assert K.kernel_for(name, x) is not None
        out, grads = _run(fn, x)
    assert_close(out, ref_out, dtype)
    assert_close(grads[0], ref_grads[0], dtype, factor=2.0)


@pytest.mark.parametrize("act_fn,activation", [(nn.SiLU(), "silu"), (nn.GELU(approximate="tanh"), "gelu_tanh")])
def test_memory_fused_gated_mlp_with_kernel_equals_torch_path(act_fn, activation):
    from peft import LoraConfig, get_peft_model

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(24, 40, bias=False), nn.Linear(24, 40, bias=True)
            self.down_proj, self.act_fn = nn.Linear(40, 24, bias=False), act_fn

    mlp = get_peft_model(MLP(), LoraConfig(r=3, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for n, p in mlp.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    m = mlp.base_model.model
    x = torch.randn(2, 7, 24)

    def run():
        xi = x.clone().requires_grad_()
        out = memory_mlp.fused_gated_mlp(xi, m.gate_proj, m.up_proj, m.down_proj, m.act_fn, activation)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
        mlp.zero_grad()
        return out.detach(), xi.grad, grads

    ref_out, ref_dx, ref_grads = run()
    with K.force_triton():
        assert K.kernel_for("gated_mlp", x) is not None
        out, dx, grads = run()
    assert_close(out, ref_out)
    assert_close(dx, ref_dx, factor=5.0)
    assert ref_grads.keys() == grads.keys() and len(grads) == 6
    for n in grads:
        assert_close(grads[n], ref_grads[n], factor=5.0)
