"""Fused low-rank (GaLore / Fira / DCT) Adam step: projected moments + back-projection + weight update.

GaLoreAdamW for W ∈ R^{m×n}, gradient G, projector P, step t (counted after its increment), as GaLore's
Algorithm 2 (Zhao et al., ICML 2024, arXiv 2403.03507) and galore-torch 1.0 run it:

    R   = Pᵀ G (side "left", P ∈ R^{m×r})   or   G Pᵀ (side "right", P ∈ R^{r×n})     ← library GEMM
    m   = β1 m + (1−β1) R,   v = β2 v + (1−β2) R²                                      ← Triton, elementwise
    N   = m / (√v + ε)                                    (eps_mode "hf": ε added to √v, GaLore/Fira)
    η_t = η · √(1−β2^t) / (1−β1^t)                        (η if correct_bias=False)
    W  ← W − η_t · (α · back(N) + S_res)                  back(N) = P N (left) or N P (right)  ← Triton GEMM,
    W  ← W − η·wd·W                                       (weight_decay_mode "after", GaLore)     update in epilogue

Variants through arguments: **Fira** passes its norm-scaled, limited residual ``residual = S`` (computed from G, R
and N by the caller, which also passes ``projected = R`` so R is not computed twice) so that
W ← W − η_t (α back(N) + S); **DCT-AdamW** passes ``proj = Q[:, idx]ᵀ`` (right side) or
``Q[:, idx]`` (left), ``scale=1``, ``eps_mode="torch"`` (N = m / (√v + ε√(1−β2^t)), the torch.optim.AdamW form)
and ``weight_decay_mode="before"`` (W ← W − η·wd·W first).

States are fp32 tensors shaped like R. The optimizers' readable rule (``GaLoreAdamW.readable``: the formula as
written) is the reference; this kernel is its CUDA twin for "moments + direction + back-projection + update", picked
by ``GaLoreAdamW.path`` and tested against the readable rule (``tests/kernels/test_optimizer_step.py``).
:func:`reference_galore_adam_step` is the kernel's own contract in plain torch (fp32, the kernel's arguments): the
oracle of the Triton kernel's unit tests and the CPU fallback of a direct :func:`fused_galore_adam_step` call; the
optimizers never call it.
"""

from __future__ import annotations

import math

import torch

from ._triton import tl, triton
from .dispatch import kernel_for, register_kernel

_ADAM_BLOCK = 1024
_BM, _BN, _BK = 32, 32, 32




def _step_constants(step: int, lr: float, betas: tuple[float, float], eps: float, correct_bias: bool, eps_mode: str):
    if step < 1:
        raise ValueError(f"galore_adam_step: step must be the 1-based count after increment, got {step}")
    if eps_mode not in ("hf", "torch"):
        raise ValueError(f"galore_adam_step: eps_mode must be 'hf' (GaLore/Fira) or 'torch' (DCT), got {eps_mode!r}")
    if not correct_bias:
        return lr, eps
    bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    if eps_mode == "torch":  # m̂/(√v̂ + ε) = (√bc2/bc1) · m/(√v + ε√bc2)
        return lr * math.sqrt(bc2) / bc1, eps * math.sqrt(bc2)
    return lr * math.sqrt(bc2) / bc1, eps


def _project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    if side == "right":
        return grad @ proj.t()
    if side == "left":
        return proj.t() @ grad
    raise ValueError(f"galore_adam_step: side must be 'left' (P ∈ R^(m×r)) or 'right' (P ∈ R^(r×n)), got {side!r}")


def reference_galore_adam_step(
    param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    step: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
    scale: float = 1.0, side: str = "right", correct_bias: bool = True, eps_mode: str = "hf",
    weight_decay_mode: str = "after", residual: torch.Tensor | None = None, projected: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Plain-torch reference of the fused step (formulas in the module docstring); updates param and states in place.

    ``projected``: R when the caller already computed it (Fira needs R for its residual); else R is computed here.
    """
    lr_t, eps_eff = _step_constants(step, lr, betas, eps, correct_bias, eps_mode)
    r = (_project(grad, proj, side) if projected is None else projected).float()
    m = betas[0] * exp_avg.float() + (1 - betas[0]) * r
    v = betas[1] * exp_avg_sq.float() + (1 - betas[1]) * r * r
    n = m / (v.sqrt() + eps_eff)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    back = proj.float() @ n if side == "left" else n @ proj.float()
    update = scale * back + (residual.float() if residual is not None else 0.0)
    p = param.detach().float()
    if weight_decay_mode == "before":
        p = p - (lr * weight_decay) * p
    p = p - lr_t * update
    if weight_decay_mode == "after":
        p = p - (lr * weight_decay) * p
    param.data.copy_(p)


# ----------------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _lowrank_adam_kernel(R, M, V, N, n, beta1, beta2, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * r
    v = beta2 * v + (1.0 - beta2) * r * r
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
    tl.store(N + offs, m / (tl.sqrt(v) + eps), mask=mask)


@triton.jit
def _backproject_update_kernel(
    L, RM, P, RES, rows, cols, rank, lr_t, alpha, wd_before, wd_after,
    s_l0, s_l1, s_r0, s_r1,
    HAS_RES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    ri = tl.program_id(0) * BM + tl.arange(0, BM)
    rj = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, rank, BK):
        rk = k0 + tl.arange(0, BK)
        lt = tl.load(L + ri[:, None] * s_l0 + rk[None, :] * s_l1, mask=(ri[:, None] < rows) & (rk[None, :] < rank), other=0.0)
        rt = tl.load(RM + rk[:, None] * s_r0 + rj[None, :] * s_r1, mask=(rk[:, None] < rank) & (rj[None, :] < cols), other=0.0)
        acc += tl.dot(lt.to(tl.float32), rt.to(tl.float32), input_precision="ieee")
    # epilogue: the weight update on the same tile
    mask = (ri[:, None] < rows) & (rj[None, :] < cols)
    update = tl.cast(alpha, tl.float32) * acc
    if HAS_RES:
        update += tl.load(RES + ri[:, None] * cols + rj[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(P + ri[:, None] * cols + rj[None, :], mask=mask, other=0.0).to(tl.float32)
    p = p - tl.cast(wd_before, tl.float32) * p
    p = p - tl.cast(lr_t, tl.float32) * update
    p = p - tl.cast(wd_after, tl.float32) * p
    tl.store(P + ri[:, None] * cols + rj[None, :], p.to(P.dtype.element_ty), mask=mask)


def triton_galore_adam_step(
    param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    step: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
    scale: float = 1.0, side: str = "right", correct_bias: bool = True, eps_mode: str = "hf",
    weight_decay_mode: str = "after", residual: torch.Tensor | None = None, projected: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Hybrid fused step: library GEMM down-projection, Triton moments, Triton back-projection + update."""
    lr_t, eps_eff = _step_constants(step, lr, betas, eps, correct_bias, eps_mode)
    if weight_decay_mode not in ("before", "after"):
        raise ValueError(f"galore_adam_step: weight_decay_mode must be 'before' or 'after', got {weight_decay_mode!r}")
    if not param.is_contiguous():
        raise ValueError("galore_adam_step: the Triton step updates param in place and needs a contiguous tensor")
    r = (_project(grad, proj, side) if projected is None else projected).contiguous()
    n_buf = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    numel = r.numel()
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()) or exp_avg.shape != r.shape:
        raise ValueError(f"galore_adam_step: moments must be contiguous tensors of the projected shape {tuple(r.shape)}")
    _lowrank_adam_kernel[(triton.cdiv(numel, _ADAM_BLOCK),)](
        r, exp_avg, exp_avg_sq, n_buf, numel, betas[0], betas[1], eps_eff, BLOCK=_ADAM_BLOCK
    )
    left, right = (proj, n_buf) if side == "left" else (n_buf, proj)
    rows, cols = param.shape
    res = residual.contiguous() if residual is not None else param
    grid = (triton.cdiv(rows, _BM), triton.cdiv(cols, _BN))
    _backproject_update_kernel[grid](
        left, right, param, res, rows, cols, left.shape[1], lr_t, scale,
        lr * weight_decay if weight_decay_mode == "before" else 0.0,
        lr * weight_decay if weight_decay_mode == "after" else 0.0,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        HAS_RES=residual is not None, BM=_BM, BN=_BN, BK=_BK,
    )  # fmt: skip


def fused_galore_adam_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor, exp_avg: torch.Tensor,
                           exp_avg_sq: torch.Tensor, **kwargs) -> None:  # fmt: skip
    """One low-rank Adam step in place: Triton on CUDA, :func:`reference_galore_adam_step` elsewhere.

    Keyword arguments as in :func:`reference_galore_adam_step` (``step`` is required and 1-based).
    """
    if param.dim() != 2 or grad.shape != param.shape:
        raise ValueError(f"galore_adam_step: needs a 2-D param and a grad of its shape, got {tuple(param.shape)} "
                         f"and {tuple(grad.shape)}")  # fmt: skip
    fn = kernel_for("galore_adam_step", param, grad, proj) if param.is_contiguous() else None
    (fn or reference_galore_adam_step)(param, grad, proj, exp_avg, exp_avg_sq, **kwargs)


register_kernel("galore_adam_step", triton_galore_adam_step)
