"""LM-head cross-entropy that never materialises the logits: the loss and its gradients, a chunk of tokens at a time.

For hidden states X ∈ R^{N×H} (already aligned with their targets y, ``ignore_index`` where no loss is taken) and
an output head f (any module: a linear, a peft LoRA or ``modules_to_save`` head, a tied or folded weight, …):

    z_i   = f(x_i)                       (V logits of token i, in the model's dtype, upcast to fp32)
    lse_i = log Σ_v exp(z_iv)
    L     = Σ_{i: y_i valid} (lse_i − z_{i y_i}) / D        D = ``num_items_in_batch`` if given, else #valid tokens
    ∂L/∂z_i = (softmax(z_i) − onehot(y_i)) / D   (0 for ignored tokens)

— the loss of transformers' ``ForCausalLMLoss`` ("sum" ÷ ``num_items_in_batch``, or "mean" over valid tokens).
Forward: per chunk of C tokens, z (C × V) without autograd, keep lse_i (4 bytes a token). Backward: per chunk,
z again through f with autograd, ∂L/∂z from lse, and one ``autograd.grad`` through f gives the chunk's ∂L/∂X and the
head parameters' gradients (accumulated in fp32, returned as this function's gradients, so ``loss.backward()``,
``autograd.grad`` and gradient scaling all see them). Peak extra memory: a chunk's logits and their gradient (C × V),
never N × V; cost: f's forward once more than the unfused loss (the recompute; Cut Cross-Entropy's choice,
arXiv 2411.09009, where Liger's fused loss computes the gradients in the forward pass instead).

On CUDA with Liger-Kernel installed, a plain ``nn.Linear`` head (tied or not) goes to Liger's fused linear
cross-entropy instead (:func:`liger_head_loss`: Triton, the gradients formed chunk by chunk in its forward). Any other
head stays on this path: Liger reads ``head.weight``, which for a peft LoRA head is the frozen base weight (its
adapter would get no gradient), and knows nothing of a folded final norm's hook.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def default_chunk(tokens: int, vocab: int, hidden: int, floor: int = 1) -> int:
    """Tokens per chunk: N / ⌈V / H⌉ rounded up to a power of two (Liger's rule: transient logits ≈ N·H numbers, the
    size of the hidden states), but at least ``floor`` tokens (or N). On a CPU :func:`chunked_head_loss` asks for at
    least 256: each chunk is GEMMs against the whole V × H head, and a CPU GEMM packs that weight into a temporary
    of its size at every call, which below a few hundred rows costs more than the product
    (``benchmarks/chunked_loss.py``: 8-token chunks made a Llama-vocabulary LoRA step 1.68× slower, 256-token ones
    1.21×); cuBLAS does not, so CUDA keeps Liger's rule.

    >>> default_chunk(4096, 128256, 4096)             # Llama-3, 4,096 tokens: 32 chunks of 128
    128
    >>> default_chunk(4096, 128256, 4096, floor=256)  # on a CPU: 16 chunks of 256
    256
    """
    liger = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / hidden))))))
    return max(1, min(tokens, max(liger, floor)))


def cpu_floor(device: torch.device | str) -> int:
    """The smallest default chunk on ``device`` (:func:`default_chunk`): 256 tokens on a CPU, 1 elsewhere."""
    return 256 if torch.device(device).type == "cpu" else 1


class ChunkedHeadLoss(torch.autograd.Function):
    """``ChunkedHeadLoss.apply(hidden, labels, denominator, head, chunk, ignore_index, *params)``: the module
    docstring's L for ``hidden`` [..., H] and flat aligned ``labels``; ``params``: the head's parameters that train
    (their gradients are this function's). ``hidden`` itself is what it saves (no view of it: a planner tracing on
    the meta device, and storage accounting, see the tensor the previous layer already keeps)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, labels: torch.Tensor, denominator: torch.Tensor, head: Callable,
                chunk: int, ignore_index: int, *params: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # the loss's arithmetic (fp32 as HF's)
        lse = torch.empty(x.shape[0], dtype=wide, device=x.device)
        total = torch.zeros((), dtype=wide, device=x.device)
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                z = head(x[start:start + chunk]).to(total.dtype)
                y = labels[start:start + chunk]
                valid = y != ignore_index
                lse_c = torch.logsumexp(z, dim=-1)
                lse[start:start + chunk] = lse_c
                target = z.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
                total += torch.where(valid, lse_c - target, 0.0).sum()
        ctx.save_for_backward(hidden, labels, lse, denominator)
        ctx.head, ctx.chunk, ctx.ignore_index, ctx.params = head, chunk, ignore_index, params
        return total / denominator.to(total.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, labels, lse, denominator = ctx.saved_tensors
        x = hidden.reshape(-1, hidden.shape[-1])
        wanted = ctx.needs_input_grad[6:]  # which of the head's parameters autograd asks a gradient of
        params = [p for p, want in zip(ctx.params, wanted) if want]
        want_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if want_x else None
        grads = [torch.zeros(p.shape, dtype=torch.float32 if p.dtype != torch.float64 else p.dtype, device=p.device)
                 for p in params]
        scale = (grad_output / denominator).to(lse.dtype)
        for start in range(0, x.shape[0], ctx.chunk):
            x_c = x[start:start + ctx.chunk].detach().requires_grad_(want_x)
            y = labels[start:start + ctx.chunk]
            valid = y != ctx.ignore_index
            with torch.enable_grad():
                z = ctx.head(x_c)
                dz = (z.detach().to(lse.dtype) - lse[start:start + ctx.chunk, None]).exp_()  # softmax(z)
                rows = torch.arange(y.shape[0], device=y.device)
                dz[rows, torch.where(valid, y, 0)] -= 1.0
                dz.mul_((valid * scale).unsqueeze(1))
                out = torch.autograd.grad(z, ([x_c] if want_x else []) + params, dz.to(z.dtype), allow_unused=True)
            if want_x:
                grad_x[start:start + ctx.chunk] = out[0]
                out = out[1:]
            for acc, g in zip(grads, out):
                if g is not None:
                    acc += g
        cast = iter(g.to(p.dtype) for p, g in zip(params, grads))
        return (None if grad_x is None else grad_x.view(hidden.shape), None, None, None, None, None,
                *[next(cast) if want else None for want in wanted])


def chunked_head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                      params: Sequence[torch.Tensor] = (), num_items_in_batch: torch.Tensor | int | None = None,
                      ignore_index: int = -100, chunk: int | None = None, vocab_size: int | None = None
                      ) -> torch.Tensor:
    """The loss of the module docstring for ``hidden`` [..., H] and aligned ``labels`` [...] (shift them first for
    causal LMs); ``params``: the head's trainable parameters; ``chunk``: tokens per chunk (default
    :func:`default_chunk`, which needs ``vocab_size``). Equal to ``F.cross_entropy(head(hidden), labels,
    reduction="sum") / num_items_in_batch`` (or ``reduction="mean"``) to rounding, gradients included."""
    tokens = hidden.numel() // hidden.shape[-1]
    y = labels.reshape(-1).to(hidden.device)
    if y.shape[0] != tokens:
        raise ValueError(f"chunked_head_loss: {tokens} hidden states but {y.shape[0]} labels")
    if num_items_in_batch is None:
        denominator = (y != ignore_index).sum()  # "mean" over valid tokens (0 valid: NaN, as torch's mean)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    if chunk is None:
        chunk = default_chunk(tokens, vocab_size or hidden.shape[-1], hidden.shape[-1], cpu_floor(hidden.device))
    return ChunkedHeadLoss.apply(hidden, y, denominator, head, int(chunk), ignore_index, *params)


#: devices where Liger's kernel is used when installed (its kernels are Triton on CUDA)
LIGER_DEVICES = ("cuda",)


def _plain_linear(head: Callable) -> bool:
    """A bare ``nn.Linear``: no adapter wrapper, no hooks, no replaced forward."""
    return type(head) is torch.nn.Linear and not (head._forward_pre_hooks or head._forward_hooks or
                                                  "forward" in head.__dict__)


def liger_head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable,
                    num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100
                    ) -> torch.Tensor | None:
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (reduction "sum" ÷ the count, as above) when it applies —
    ``hidden`` on a device of :data:`LIGER_DEVICES`, ``liger_kernel`` importable, ``head`` a plain ``nn.Linear`` —
    else None (the caller uses :func:`chunked_head_loss`)."""
    if hidden.device.type not in LIGER_DEVICES or not _plain_linear(head):
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    y = labels.reshape(-1).to(hidden.device)
    x = hidden.reshape(-1, hidden.shape[-1])
    total = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(head.weight, x, y,
                                                                                        head.bias)
    denominator = (y != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(denominator, device=hidden.device)


__all__ = ["LIGER_DEVICES", "ChunkedHeadLoss", "chunked_head_loss", "default_chunk", "liger_head_loss"]
