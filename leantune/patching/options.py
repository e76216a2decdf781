"""The patcher's options: ``MemoryConfig`` (which memory-saving techniques :func:`leantune.memory.apply` switches on)
and the kernel names :func:`leantune.kernels.apply` accepts. Both views of the patcher read them from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leantune._validation import check_bool, check_int, check_number

from .budget import DEFAULT_BUDGET_MODES, check_modes, parse_budget

#: the exact kernels (same forward and gradients up to rounding); the default set
EXACT_KERNELS = ("lora_linear", "lowrank_linear", "ms_rmsnorm", "ms_layernorm", "gated_mlp")
#: opt-in, approximate gradients (2-bit activation backward)
APPROXIMATE_KERNELS = ("regelu2", "resilu2")
ALL_KERNELS = EXACT_KERNELS + APPROXIMATE_KERNELS


@dataclass
class MemoryConfig:
    """Switches for each technique (all exact except ``approx_activations`` and ``velora``).

    Args:
        ms_norms: MS-LayerNorm / MS-RMSNorm with the affine folded into the following frozen linears (exact up to
            the rounding of the folded weights; the norm then saves only a per-row rstd).
        approx_activations: ReGELU2 / ReSiLU2 — exact forward, 2-bit step-derivative backward (approximate gradient).
        fused_gated_mlp: one autograd function per SwiGLU/GeGLU MLP saving (x, e, g) only (exact).
        velora: compress the inputs saved by LoRA-A of ``velora_targets`` to one scalar per sub-token (approximate
            weight gradient of the adapter).
        velora_targets: roles to compress, from "attn_out" (o_proj / attention output dense) and "mlp_down".
        velora_num_groups: sub-tokens per token G (VeLoRA default 32); reduced to a divisor of the width if needed.
        velora_scale: multiplier on the adapter weight gradient (VeLoRA's ``velora_scale``).
        fold_final_norm: also fold the final norm into ``lm_head`` (causal LMs).
        untie_embeddings: if ``lm_head`` is tied to the input embeddings, untie it (copy) so the final norm can be
            folded; if False the final norm is skipped and the report says so.
        keep_original_weights: keep a CPU copy of every folded weight so ``undo()`` restores it bit-exactly
            (otherwise it divides by γ again).
        chunked_loss: causal LMs trained with labels compute the LM-head cross-entropy a chunk of tokens at a time
            (``leantune.kernels.chunked_loss``): the [tokens × vocab] logits and their gradient never exist (exact:
            the same loss and gradients to fp32 rounding); ``outputs.logits`` is then None in training. Off by
            default (code that reads the training logits would break).
        loss_chunk_tokens: tokens per chunk of the chunked loss (None: N / ⌈V / H⌉ rounded to a power of two).
        budget: activation budget of the decoder layers — a fraction of what they keep without it (``0.25``,
            ``"25%"``) or bytes (``"6GB"``, an int). Per layer the policy (``leantune.patching.budget``) picks the
            cheapest of keep / selective recomputation / checkpointing / offload (CUDA) that fits, from a cost model
            measured on the first training step of each input shape; gradients are those without it (exact).
        layer_modes: instead of a budget, the mode of every layer (one name for all, or one per layer) from
            ``leantune.patching.recompute.MODES``.
        budget_modes: the modes the budget may pick from (besides ``keep``); add ``"division"`` to let it use
            DIVISION's lossy compression of saved tensors (``leantune.patching.division``; off by default).
        verbose: print the report of what was patched and what was skipped (and each budget decision).
    """

    ms_norms: bool = True
    approx_activations: bool = True
    fused_gated_mlp: bool = True
    velora: bool = False
    velora_targets: tuple[str, ...] = ("attn_out", "mlp_down")
    velora_num_groups: int = 32
    velora_scale: float = 1.0
    fold_final_norm: bool = True
    untie_embeddings: bool = False
    keep_original_weights: bool = True
    chunked_loss: bool = False
    loss_chunk_tokens: int | None = None
    budget: float | int | str | None = None
    layer_modes: tuple[str, ...] | str | None = None
    budget_modes: tuple[str, ...] = DEFAULT_BUDGET_MODES
    verbose: bool = False

    def __post_init__(self) -> None:
        for name in ("ms_norms", "approx_activations", "fused_gated_mlp", "velora", "fold_final_norm",
                     "untie_embeddings", "keep_original_weights", "chunked_loss", "verbose"):
            check_bool(self, name)
        targets = self.velora_targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or \
                not set(targets) <= {"attn_out", "mlp_down"} or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"MemoryConfig.velora_targets must be a list of roles from 'attn_out' and 'mlp_down', "
                             f"got {targets!r}.")
        check_int(self, "velora_num_groups", minimum=1)
        check_int(self, "loss_chunk_tokens", minimum=1, optional=True)
        check_number(self, "velora_scale")
        self.velora_targets = tuple(self.velora_targets)
        if self.budget is not None:
            parse_budget(self.budget)
        if self.layer_modes is not None:
            if self.budget is not None:
                raise ValueError("MemoryConfig: give budget or layer_modes, not both")
            self.layer_modes = check_modes(self.layer_modes)
        self.budget_modes = tuple(m for m in check_modes(self.budget_modes) if m != "keep")

    @classmethod
    def all(cls, **overrides) -> "MemoryConfig":
        """Every technique on (including the approximate ones)."""
        return cls(**{"velora": True, **overrides})

    @classmethod
    def exact(cls, **overrides) -> "MemoryConfig":
        """Only the exact techniques (MS norms + fused gated MLP)."""
        return cls(**{"approx_activations": False, "velora": False, **overrides})

    @classmethod
    def none(cls, **overrides) -> "MemoryConfig":
        """No technique (``budget`` / ``layer_modes`` may still be given: recomputation alone)."""
        return cls(**{"ms_norms": False, "approx_activations": False, "fused_gated_mlp": False, "velora": False,
                      **overrides})

    def to_dict(self) -> dict:
        return asdict(self)
