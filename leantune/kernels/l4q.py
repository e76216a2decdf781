"""L4Q's linear: the adapter is merged into the weight *before* a learned-step fake quantizer (Jeon et al., arXiv
2402.04902, "LoRA-wise LSQ"), so the model that trains is the quantized model that will be served.

With ``W0 ∈ R^{o×i}`` frozen, ``B ∈ R^{o×r}``, ``A ∈ R^{r×i}`` and one step ``s`` and zero point ``z`` per group of
``g`` consecutive input columns of one output row (the GPTQ / torchao ``PerGroup(g)`` layout, ``s, z ∈ R^{o×i/g}``):

    W' = W0 + α·B A
    v  = W' / s + z,          q = clamp(round(v), Q_n, Q_p),      Q_n = −2^(b−1), Q_p = 2^(b−1) − 1
    Ŵ  = (q − z) · s                                            (computed in the model's dtype)
    y  = x Ŵᵀ

This is LSQ+'s asymmetric quantizer (Bhalgat et al., arXiv 2004.09576, eq. 3) written with a float zero point
``z = −β/s`` instead of the offset β: the same grid, but ``(q, s, z)`` is then exactly what torchao's
``IntxUnpackedToInt8Tensor`` stores and dequantizes as ``(q − z)·s`` in the model dtype, so an export is bit-exact.

Gradients (straight-through estimator on ``round``; ``M = 1[Q_n ≤ v ≤ Q_p]``, ``G = Σ_tokens g_yᵀ x``):

    ∂L/∂x = g_y Ŵ                       ∂L/∂A = α Bᵀ (M ⊙ G)          ∂L/∂B = α (M ⊙ G) Aᵀ
    ∂L/∂s_k = γ Σ_{j∈k} G_j · (round(v_j) − v_j  if M_j  else  q_j − z_k)
    ∂L/∂z_k = γ Σ_{j∈k} G_j · (0                 if M_j  else  −s_k)

with LSQ's gradient scale ``γ = 1/√(g·Q_p)`` (Esser et al., arXiv 1902.08153 §2.2; N = g numbers share a step).
The backward recomputes ``W'``, ``v`` and ``q`` from what forward saved — ``(x, W0, A, B, s, z)`` — so no weight-sized
tensor lives between forward and backward; ``G`` and ``Ŵ`` are transients of the backward (L4Q §3.3: training costs
about what LoRA on a frozen base costs).

torch only: the transients are two (o × i) GEMM-sized tensors per layer, and on a GPU the two GEMMs dominate; a
fused Triton quantizer is not written (say so in the op table).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def qrange(bits: int) -> tuple[int, int]:
    """``(Q_n, Q_p)`` of a signed ``bits``-bit code."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def lsq_gradient_scale(group: int, bits: int) -> float:
    """LSQ's ``γ = 1/√(N·Q_p)`` for ``N = group`` numbers per step (arXiv 1902.08153 §2.2)."""
    return 1.0 / math.sqrt(group * qrange(bits)[1])


def merged_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W' = W0 + α·B A`` in float32 (float64 if any input is), the number the quantizer rounds."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return w0.to(dtype) + alpha * (b.to(dtype) @ a.to(dtype))


def quantize_groups(w_prime: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, q)`` of ``W'`` viewed as ``(o, i/g, g)``: ``v = W'/s + z`` and ``q = clamp(round(v), Q_n, Q_p)``."""
    o, i = w_prime.shape
    groups = scale.shape[-1]
    v = w_prime.view(o, groups, i // groups) / scale.to(w_prime.dtype)[..., None] + zero.to(w_prime.dtype)[..., None]
    qn, qp = qrange(bits)
    return v, torch.clamp(torch.round(v), qn, qp)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Ŵ = (q − z)·s`` computed in ``dtype`` in this order — torchao's ``dequantize_affine`` does the same, which
    is what makes an export bit-exact; ``q`` is ``(o, i/g, g)``, the result ``(o, i)``."""
    w_hat = (q.to(dtype) - zero.to(dtype)[..., None]) * scale.to(dtype)[..., None]
    return w_hat.reshape(q.shape[0], -1)


#: the quantizer runs this many weight entries at a time (whole output rows: a group never spans two rows, so chunks
#: of rows are exact), so its float32 temporaries stay ~1 MB each instead of several weight-sized tensors per layer
CHUNK_NUMEL = 1 << 18


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_NUMEL // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def served_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  alpha: float, bits: int, codes: bool = False):
    """``Ŵ`` (o, i) in W0's dtype, quantized a chunk of rows at a time (no autograd); ``codes=True``: ``(Ŵ, q)`` with
    the integer codes ``q`` (o, i) as int8 as well (what an export stores)."""
    w_hat = torch.empty_like(w0, memory_format=torch.contiguous_format)
    q_all = torch.empty(w0.shape, dtype=torch.int8, device=w0.device) if codes else None
    with torch.no_grad():
        for rows in _row_chunks(*w0.shape):
            _, q = quantize_groups(merged_weight(w0[rows], a, b[rows], alpha), scale[rows], zero[rows], bits)
            w_hat[rows] = dequantize_groups(q, scale[rows], zero[rows], w0.dtype)
            if codes:
                q_all[rows] = q.reshape(q.shape[0], -1).to(torch.int8)
    return (w_hat, q_all) if codes else w_hat


class L4QLinearFunction(torch.autograd.Function):
    """``y = x Ŵᵀ`` with ``Ŵ = FQ(W0 + α B A)``; see the module docstring for the formulas and what is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor, alpha: float, bits: int, grad_scale: float,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        w_hat = served_weight(w0, a, b, scale, zero, alpha, bits)
        ctx.save_for_backward(x, w0, a, b, scale, zero)
        ctx.hyper = (alpha, bits, grad_scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        # the bias inside the one GEMM, as the served model's F.linear(x, deq(W), b) adds it (bit-exact export)
        return F.linear(x.to(w0.dtype), w_hat, None if bias is None else bias.to(w0.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w0, a, b, scale, zero = ctx.saved_tensors
        alpha, bits, grad_scale = ctx.hyper
        needs = ctx.needs_input_grad
        grad_x = grad_bias = None
        if needs[9]:  # a bias the user chose to train
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        if needs[0]:
            grad_x = (grad_y.to(w0.dtype) @ served_weight(w0, a, b, scale, zero, alpha, bits)).to(x.dtype)
        if not any(needs[2:6]):
            return grad_x, None, None, None, None, None, None, None, None, grad_bias
        qn, qp = qrange(bits)
        work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(work)
        x2 = x.reshape(-1, x.shape[-1]).to(work)
        a_w, b_w = a.to(work), b.to(work)
        grad_a = torch.zeros_like(a_w) if needs[2] else None
        grad_b = torch.empty_like(b_w) if needs[3] else None
        grad_s = torch.empty(scale.shape, dtype=work, device=scale.device) if needs[4] else None
        grad_z = torch.empty(zero.shape, dtype=work, device=zero.device) if needs[5] else None
        for rows in _row_chunks(*w0.shape):
            v, q = quantize_groups(merged_weight(w0[rows], a, b[rows], alpha), scale[rows], zero[rows], bits)
            grad_w = (g2[:, rows].T @ x2).view_as(v)  # G, (rows, i/g, g)
            inside = (v >= qn) & (v <= qp)
            masked = torch.where(inside, grad_w, 0).reshape(-1, w0.shape[1])  # ∂L/∂W' = M ⊙ G
            if grad_a is not None:
                grad_a.addmm_(b_w[rows].T, masked, alpha=alpha)
            if grad_b is not None:
                grad_b[rows] = alpha * (masked @ a_w.T)
            del masked
            if grad_s is not None:
                ds = torch.where(inside, torch.round(v) - v, q - zero[rows].to(work)[..., None])
                grad_s[rows] = grad_scale * (grad_w * ds).sum(-1)
            if grad_z is not None:
                grad_z[rows] = grad_scale * torch.where(inside, 0, -grad_w).sum(-1) * scale[rows].to(work)
        return (grad_x, None, _cast(grad_a, a), _cast(grad_b, b), _cast(grad_s, scale), _cast(grad_z, zero),
                None, None, None, grad_bias)


def _cast(grad: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if grad is None else grad.to(like.dtype)


def l4q_linear(x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor, alpha: float, bits: int, grad_scale: Optional[float] = None,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x FQ(W0 + α B A)ᵀ + bias`` (module docstring); ``grad_scale`` None means LSQ's ``1/√(g·Q_p)``."""
    o, i = w0.shape
    groups = scale.shape[-1]
    if scale.shape != (o, groups) or zero.shape != scale.shape or i % groups:
        raise ValueError(f"L4Q: step and zero point must be (out, in/group) = ({o}, in/group) with in={i} divisible "
                         f"by the group count; got {tuple(scale.shape)} and {tuple(zero.shape)}.")
    if grad_scale is None:
        grad_scale = lsq_gradient_scale(i // groups, bits)
    return L4QLinearFunction.apply(x, w0, a, b, scale, zero, float(alpha), int(bits), float(grad_scale), bias)


def reference_l4q_linear(x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                         zero: torch.Tensor, alpha: float, bits: int, grad_scale: float) -> torch.Tensor:
    """The same function through plain autograd (the test oracle): LSQ's gradient-scale trick
    ``s ↦ γs + (s − γs).detach()`` and the STE ``round(u) ↦ u + (round(u) − u).detach()`` on ``clamp(v)``."""
    qn, qp = qrange(bits)
    s = scale * grad_scale + (scale - scale * grad_scale).detach()
    z = zero * grad_scale + (zero - zero * grad_scale).detach()
    o, i = w0.shape
    w_prime = (w0 + alpha * (b @ a)).view(o, s.shape[-1], -1)
    clamped = torch.clamp(w_prime / s[..., None] + z[..., None], qn, qp)
    q = clamped + (torch.round(clamped) - clamped).detach()
    return F.linear(x, ((q - z[..., None]) * s[..., None]).reshape(o, i))
