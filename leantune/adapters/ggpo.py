"""LoRA-GGPO: gradient-guided random weight perturbation for LoRA-type training (Chang et al., arXiv 2502.14538 v1).

GGPO minimises the expected loss under a random perturbation of the merged weight (the Flat-LoRA objective) with a
covariance built from weight *and* gradient norms:

    min_{A,B} E_ε L(W′ + ε),   W′ = W₀ + s·B A,   ε_ij ~ N(0, σ_i²)   (independent per entry, one σ per output row i)
    σ_i = f_t · (σ · ‖W′_i‖ + β · ‖G_i‖²) / √n,   G = s·(∇B·A + B·∇A)   (the gradient of ΔW from the factors')

The paper's method section was not available to us (only its abstract, v1); the formula above is
the published description (weight norms + gradient norms, row-wise) in the form of the implementation written from
the v1 text (kohya-ss sd-scripts, PR 1974), with these choices, each an option: ‖W′_i‖ is the exact row norm (not a
mean over rows), ‖G_i‖ is the last step's (the first step has only the weight term), n = in_features (Flat-LoRA's
normalisation; ``norm_features="out"`` for the other reading), f_t = 1 (``ramp="cosine"`` gives Flat-LoRA's
½(1 − cos(πt/T))). Defaults σ = 0.03, β = 0.01 (that implementation's, reportedly the paper's).

Applied functionally: in training mode each adapted layer's output gets x εᵀ with ε drawn from a private generator,
so the base weight is never modified (a bf16 add-then-subtract would not restore it) and dropout / data order are
untouched. Nothing is stored but σ (out numbers per layer); nothing is saved with the adapter (a training-time hook).
Works on peft LoRA layers and leantune's low-rank layers (LoRA-XS, LoRA-SB, ALLoRA, DyLoRA, NOLA).
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import TrainerCallback

from leantune._utils import upcast
from leantune.adapters.low_rank import LowRankLayer, base_weight_out_in

RAMPS = ("none", "cosine")


def _delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """ΔW (out × in) of the adapter, differentiable through its trainable parameters."""
    return layer.get_delta_weight(adapter)


class GGPO:
    """Attach GGPO to every LoRA-type layer of ``model`` (module docstring); ``remove()`` detaches it.

    Call :meth:`after_backward` once per optimizer step, after the gradients are final and before the optimizer
    steps (the Trainer callback does): it records ‖G_i‖ for the next steps' σ.
    """

    def __init__(self, model: nn.Module, sigma: float = 0.03, beta: float = 0.01, ramp: str = "none",
                 total_steps: int | None = None, norm_features: str = "in", seed: int = 0) -> None:
        _check_options(sigma, beta, ramp, norm_features)
        if ramp == "cosine" and not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError("GGPO ramp='cosine' needs total_steps (the number of optimizer steps)")
        self.sigma, self.beta, self.ramp, self.total_steps = float(sigma), float(beta), ramp, total_steps
        self.norm_features = norm_features
        self.step = 0
        self.generator: torch.Generator | None = None
        self.seed = seed
        self.layers = [(n, m) for n, m in model.named_modules() if _is_adapted_linear(m)]
        if not self.layers:
            raise ValueError("GGPO found no LoRA-type layer (peft LoRA or a leantune low-rank adapter) on an nn.Linear "
                             "to perturb; add such an adapter first.")
        self.grad_norms: dict[nn.Module, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for _, m in self.layers]

    # ---- σ ------------------------------------------------------------------------------------------------
    def factor(self) -> float:
        if self.ramp == "none":
            return 1.0
        return 0.5 * (1.0 - math.cos(math.pi * min(self.step, self.total_steps) / self.total_steps))

    @torch.no_grad()
    def row_std(self, layer: nn.Module) -> torch.Tensor:
        """σ_i for every output row of ``layer``'s active adapter (module docstring)."""
        adapter = layer.active_adapters[0]
        W = upcast(base_weight_out_in(layer)) + upcast(_delta(layer, adapter))  # fp32 (fp64 for fp64)
        std = self.sigma * torch.linalg.vector_norm(W, dim=1)
        if layer in self.grad_norms:
            std = std + self.beta * self.grad_norms[layer] ** 2
        n = W.shape[1] if self.norm_features == "in" else W.shape[0]
        return std * (self.factor() / math.sqrt(n))

    @torch.no_grad()
    def after_backward(self) -> None:
        """Record ‖G_i‖ = ‖s(∇B A + B ∇A)‖_row of every layer (from its factors' gradients), advance the step."""
        for _, layer in self.layers:
            G = _delta_gradient(layer)
            if G is not None:
                self.grad_norms[layer] = torch.linalg.vector_norm(upcast(G), dim=1)
        self.step += 1

    # ---- the perturbation ------------------------------------------------------------------------------------
    def _hook(self, layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if not layer.training or layer.disable_adapters or layer.merged or not torch.is_grad_enabled():
            return output
        x = args[0]
        if self.generator is None or self.generator.device != x.device:
            self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        std = self.row_std(layer)
        noise = torch.randn(std.shape[0], x.shape[-1], generator=self.generator, device=x.device,
                            dtype=torch.float32).to(std.dtype) * std[:, None]
        return output + nn.functional.linear(x, noise.to(x.dtype))  # x εᵀ: the output at W′ + ε

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _check_options(sigma: float, beta: float, ramp: str, norm_features: str) -> None:
    for name, value in (("sigma", sigma), ("beta", beta)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"GGPO {name} must be a number >= 0, got {value!r}")
    if ramp not in RAMPS:
        raise ValueError(f"GGPO ramp must be one of {RAMPS}, got {ramp!r}")
    if norm_features not in ("in", "out"):
        raise ValueError(f"GGPO norm_features must be 'in' or 'out', got {norm_features!r}")


def _is_adapted_linear(module: nn.Module) -> bool:
    if not isinstance(module, (LoraLayer, LowRankLayer)):
        return False
    base = module.get_base_layer()
    return isinstance(base, nn.Linear) and hasattr(module, "get_delta_weight")


def _delta_gradient(layer: nn.Module) -> torch.Tensor | None:
    """G = J·∇θ: the change of ΔW along the trainable parameters' gradients (None without gradients). For LoRA
    (ΔW = s·B A) this is s(∇B·A + B·∇A); for LoRA-XS (s·B R A) s·B ∇R A; in general one Jacobian-vector product,
    computed exactly as ∂/∂u ⟨Jᵀu, ∇θ⟩ (two small backward passes through ΔW)."""
    adapter = layer.active_adapters[0]
    params = [p for p in layer.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return None
    with torch.enable_grad():
        delta = _delta(layer, adapter)
        if not delta.requires_grad:
            return None
        u = torch.zeros_like(delta, requires_grad=True)
        vjp = torch.autograd.grad(delta, params, u, create_graph=True, allow_unused=True)
        dot = sum((g * p.grad.to(g.dtype)).sum() for g, p in zip(vjp, params) if g is not None)
        if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
            return None
        (jvp,) = torch.autograd.grad(dot, u)
    return jvp


class GGPOCallback(TrainerCallback):
    """``transformers`` callback applying :class:`GGPO` during ``Trainer.train()``: attached at the start (the cosine
    ramp spans ``max_steps``), gradient norms recorded before each optimizer step, detached at the end."""

    def __init__(self, sigma: float = 0.03, beta: float = 0.01, ramp: str = "none", norm_features: str = "in",
                 seed: int = 0) -> None:
        _check_options(sigma, beta, ramp, norm_features)
        self.options = dict(sigma=sigma, beta=beta, ramp=ramp, norm_features=norm_features, seed=seed)
        self.ggpo: GGPO | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        total = state.max_steps if self.options["ramp"] == "cosine" else None
        self.ggpo = GGPO(model, total_steps=total, **self.options)
        self.ggpo.step = state.global_step  # a resumed run continues the ramp

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.ggpo is not None:
            self.ggpo.after_backward()

    def on_train_end(self, args, state, control, **kwargs):
        if self.ggpo is not None:
            self.ggpo.remove()
            self.ggpo = None
