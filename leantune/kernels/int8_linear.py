"""A linear layer whose weight is held as INT8 codes + one fp32 scale per block (Q-GaLore's quantized weights, Zhang et
al. 2024, arXiv 2407.08296 §3.2), trained by an optimizer that reads the float gradient this layer leaves.

    y = x · deq(W)ᵀ + b,          deq(W)[i, j] = q[i, j] · s[i, ⌊j / B⌋]      (:mod:`.quantize`, blocks along rows)

Backward computes ``grad_x = grad_y · deq(W)`` and the weight's float gradient ``G = grad_yᵀ · x`` (in x's dtype),
which cannot live in the int8 parameter's ``.grad`` (torch requires a gradient of the parameter's dtype): it is added
to ``weight.qgrad`` and, if an optimizer registered one, ``weight.qgrad_hook(weight)`` is called (per-layer updates).
The dequantized weight is a transient of forward and backward, never saved: what stays between them is x only.

A 0-element anchor that requires grad enters the autograd function, so its backward runs even when x does not require
grad (the first layer of a frozen stack, an input without grad): Q-GaLore's linear silently produced no weight
gradient there.

On CUDA with Triton the forward and the input gradient run one kernel that dequantizes a (BLOCK_N × BLOCK_K) tile of
W in registers inside the matmul loop (:func:`_int8_matmul_kernel`); elsewhere the torch reference dequantizes the
whole matrix for the GEMM, on the CPU in one C pass (``csrc/int8_dequant.c``: in bf16 the four torch passes took about
as long as the GEMM itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._triton import tl, triton
from .cpu_native import int8_dequant
from .dispatch import kernel_for, register_kernel
from .quantize import dequantize, quantize

DEFAULT_BLOCK = 256


#: rows are (de)quantized this many numbers at a time, so the fp32 temporaries of a 7B layer (45 M numbers) stay
#: ~16 MB each instead of 180 MB; a row never shares a block with the next, so chunks of rows are exact
CHUNK_NUMEL = 1 << 22


def _row_chunks(weight: torch.Tensor, block: int):
    """(rows, scale slice) of consecutive row chunks of about :data:`CHUNK_NUMEL` numbers."""
    m, n = weight.shape
    per_row = math.ceil(n / block)
    step = max(1, CHUNK_NUMEL // max(n, 1))
    for start in range(0, m, step):
        stop = min(m, start + step)
        yield slice(start, stop), slice(start * per_row, stop * per_row)


def dequantized_weight(weight: torch.Tensor, scales: torch.Tensor, block: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """deq(W) of an (m, n) INT8 weight with (m · ⌈n / block⌉,) fp32 scales, in ``dtype``: on the CPU one C pass
    (``cpu_native.int8_dequant``, the same bits), else the torch reference row chunk by chunk."""
    native = int8_dequant(weight, scales, block, dtype)
    if native is not None:
        return native
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for rows, blocks in _row_chunks(weight, block):
        out[rows] = dequantize(weight[rows], scales[blocks], out[rows].shape, block, per_row=True, dtype=dtype)
    return out


def is_int8_weight(p: torch.Tensor) -> bool:
    """Whether ``p`` is the weight of an :class:`Int8Linear` (trainable through ``qgrad``)."""
    return p.dtype == torch.int8 and getattr(p, "int8_module", None) is not None


class Int8LinearFunction(torch.autograd.Function):
    """``Int8LinearFunction.apply(x, anchor, weight, scales, bias, block) -> x · deq(W)ᵀ + b``; saves x."""

    @staticmethod
    def forward(ctx, x, anchor, weight, scales, bias, block):
        out = int8_matmul(x, weight, scales, block, transpose=True)
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(x)
        ctx.weight, ctx.scales, ctx.block = weight, scales, block
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = int8_matmul(grad_out, weight, ctx.scales, ctx.block, transpose=False) \
            if ctx.needs_input_grad[0] else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)
        if getattr(weight, "qgrad", None) is None:
            weight.qgrad = grad_w
        else:
            weight.qgrad.add_(grad_w)
        hook = getattr(weight, "qgrad_hook", None)
        if hook is not None:
            hook(weight)
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return grad_x, None, None, None, grad_b, None


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, block: int,
                transpose: bool) -> torch.Tensor:
    """x · deq(W)ᵀ (``transpose``, forward) or x · deq(W) (input gradient), in x's dtype."""
    fn = kernel_for("int8_matmul", x, weight)
    if fn is not None:
        return fn(x, weight, scales, block, transpose)
    w = dequantized_weight(weight, scales, block, x.dtype)
    return F.linear(x, w) if transpose else x @ w


class Int8Linear(nn.Module):
    """``nn.Linear`` with an INT8 weight (blockwise absmax along rows, block ``block_size``) and a float bias.

    ``weight`` is an int8 ``nn.Parameter`` (``requires_grad=False``: torch has no integer gradients; the float gradient
    goes to ``weight.qgrad``); ``weight_scale`` is a persistent fp32 buffer, kept fp32 by ``model.to(dtype)`` (a bf16
    scale would move every weight of its block by up to 2⁻⁹ relative).

    ``state_dict`` holds ``weight`` as deq(W) in the model's float dtype (``float_dtype``) next to ``weight_scale``:
    a plain loader (``from_pretrained`` of the unconverted model, a serving stack) reads correct float weights, never
    the codes as numbers; loading into an ``Int8Linear`` recovers the codes exactly, q = round(w / s) (|q| ≤ 127 needs
    7 significant bits, every float dtype has ≥ 8), so a resumed run continues bit for bit. A float checkpoint without
    scales is quantized on load (nearest rounding).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = DEFAULT_BLOCK,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, int(block_size)
        self.from_conv1d = False  # set when it replaced a transformers Conv1D (x W + b, W stored (in, out))
        self.float_dtype = dtype or torch.float32  # the dtype state_dict writes deq(W) in
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        blocks = out_features * math.ceil(in_features / self.block_size)
        self.register_buffer("weight_scale", torch.zeros(blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._bind()

    def _bind(self) -> None:
        self.weight.int8_module = self  # how the optimizer finds the scales of a parameter it is given

    def __setstate__(self, state) -> None:  # deepcopy / unpickling make a new Parameter without the attribute
        super().__setstate__(state)
        self._bind()

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = DEFAULT_BLOCK) -> "Int8Linear":
        """The INT8 twin of ``linear`` (nearest rounding); the float weight is not kept."""
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, w.device, w.dtype)
        new.set_weight(w)
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Quantize the float matrix ``w`` into this layer (stochastic rounding with a ``generator``)."""
        for rows, blocks in _row_chunks(self.weight, self.block_size):  # bounded temporaries; noise drawn in order
            codes, scales = quantize(w[rows], 8, self.block_size, per_row=True, generator=generator)
            self.weight[rows] = codes
            self.weight_scale[blocks] = scales

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """deq(W) in ``dtype``."""
        return dequantized_weight(self.weight, self.weight_scale, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.weight, "int8_module", None) is not self:  # e.g. load_state_dict(assign=True)
            self._bind()
        if not torch.is_grad_enabled():
            out = int8_matmul(x, self.weight, self.weight_scale, self.block_size, transpose=True)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        anchor = torch.empty(0, device=x.device, requires_grad=True)  # makes backward run (module docstring)
        return Int8LinearFunction.apply(x, anchor, self.weight, self.weight_scale, self.bias, self.block_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dequantized(self.float_dtype)  # module docstring: never the codes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w, s = state_dict.get(prefix + "weight"), state_dict.get(prefix + "weight_scale")
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.shape == self.weight.shape:
            if isinstance(s, torch.Tensor) and s.shape == self.weight_scale.shape:  # ours: the exact codes back
                scale = s.to(device=w.device, dtype=torch.float32)
                per_row = scale.reshape(w.shape[0], -1).repeat_interleave(self.block_size, 1)[:, : w.shape[1]]
                q = torch.where(per_row > 0, w.float() / per_row, 0.0).round_().clamp_(-127, 127)
                state_dict[prefix + "weight"] = q.to(torch.int8)
            else:  # a float checkpoint: quantized here
                codes, scales = quantize(w, 8, self.block_size, per_row=True)
                state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = codes, scales
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        scale = self._buffers.pop("weight_scale")
        probe = fn(torch.empty(0, dtype=self.float_dtype))
        if probe.is_floating_point():
            self.float_dtype = probe.dtype  # model.to(bf16): what state_dict writes
        try:
            result = super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=scale.device)).device  # move with the module, keep fp32
            self._buffers["weight_scale"] = scale.to(device)
        self._bind()
        return result

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 blocks of {self.block_size}")


# ---- Triton: matmul with the INT8 weight dequantized per tile ----------------------------------------------------
@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, blocks_per_row, stride_xm, stride_wr,
                        QBLOCK: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = x[M, K] · deq(W)ᵀ (TRANSPOSE: W is N × K) or x[M, K] · deq(W) (W is K × N); fp32 accumulation.
    A weight element W[r, c] has scale s[r · blocks_per_row + c // QBLOCK]."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        if TRANSPOSE:  # W row = output column n, W column = k
            row, col = rn[None, :], rk[:, None]
        else:  # W row = k, W column = output column n
            row, col = rk[:, None], rn[None, :]
        mask = (rk[:, None] < K) & (rn[None, :] < N)
        q = tl.load(w_ptr + row * stride_wr + col, mask=mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + row * blocks_per_row + col // QBLOCK, mask=mask, other=0.0)
        acc += tl.dot(x, q * s)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _triton_int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, block: int,
                        transpose: bool) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    M, K = x2.shape
    N = w.shape[0] if transpose else w.shape[1]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    BM, BN, BK = 32, 32, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _int8_matmul_kernel[grid](x2, w, scales, out, M, N, K, math.ceil(w.shape[1] / block), x2.stride(0), w.stride(0),
                              QBLOCK=block, TRANSPOSE=transpose, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    return out.reshape(*x.shape[:-1], N)


register_kernel("int8_matmul", _triton_int8_matmul)
