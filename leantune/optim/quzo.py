"""QuZO: zeroth-order fine-tuning with quantized perturbations (Zhou et al., arXiv 2502.12346), on MeZO's in-place,
seed-regenerated scheme (Malladi et al., arXiv 2305.17333 Algorithm 1). No backward pass: memory is inference memory
(no saved activations, no gradients, no optimizer moments).

Per optimizer step t and query i = 1…n, with one Gaussian u_i ~ N(0, I) over all trained parameters:

    u_{i,1}, u_{i,2} = two *independent* stochastic roundings Q_b(u_i) onto a b-bit grid   (E[Q_b(u)] = u)
    μ_i = (L(θ + ε u_{i,1}) − L(θ − ε u_{i,1})) / (2ε)                                   (two forward passes)
    θ ← θ − η · (Σ_i μ_i u_{i,2} / n + λ θ)

Q_b is QuZO's per-tensor min/max grid with 2^b − 1 levels, rounded down or up with probability equal to the
fraction (so the perturbations are b-bit numbers). Independence of the two roundings is what makes the estimate
unbiased: E[(u₁ᵀ∇L) u₂] = E[u uᵀ]∇L = ∇L, whereas reusing one rounding (the authors' code re-seeds it) gives
(I + E[diag Var(Q(u)|u)])∇L, ~1.4× too large at 2 bits (``independent=False`` reproduces it, for the tests).

With ``weight_bits`` the weights themselves live on a b-bit grid, as QuZO's low-precision model (arXiv 2502.12346,
the update θ̄ ← θ̄ − Σ_i Q(η μ_i u_{i,2} / n)): each tensor gets a symmetric per-tensor step δ = max|θ|/(2^(b−1) − 1)
at the first step (θ is rounded to nearest onto it, the RTN-quantized model), and every update is stochastically
rounded onto multiples of δ (unbiased: E[θ_{t+1}] = θ_t − η(…), the exact update, unless clipped at ±(2^(b−1)−1)δ).
The values are held in the parameter's dtype (the grid, not the storage: memory is that of the dtype).

Nothing of size θ is stored: u and both roundings are regenerated from ``(seed, step, query, parameter index)`` in
each phase (+ε, −2ε, +ε restores θ to float rounding, then the update), one parameter at a time. Every rank derives
the same seeds, so under DDP only the scalars μ_i are averaged (one all-reduce of n numbers per step).

Use it directly — ``loss = opt.step(closure)`` with a closure that returns the loss of a forward pass — or through
``Trainer``: :func:`install_in_trainer` (what ``LeanTuneCallback(optimizer=QuZOConfig(...))`` calls) replaces the
Trainer's training step by :meth:`QuZO.estimate` (the two forwards, in eval mode so both see the same function) and
its ``optimizer.step()`` applies the update, so learning-rate schedules, gradient accumulation (μ summed over the
micro-batches of a step, each loss scaled as Trainer scales it for backward), checkpoints and
``resume_from_checkpoint`` (the step counter is in the state dict; the seeds follow from it) work unchanged.
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from leantune._utils import one_bnb_cpu_path, upcast
from leantune._validation import check_int, check_number


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stochastic_round(u: torch.Tensor, bits: Optional[int], generator: torch.Generator,
                     inplace: bool = False) -> torch.Tensor:
    """QuZO's Q_b: ``lo + s·(⌊x⌋ + Bernoulli(x − ⌊x⌋))`` with ``x = (u − lo)/s``, ``s = (max − min)/(2^b − 1)``;
    unbiased (E = u). ``bits=None`` returns u (MeZO). ``inplace``: u is overwritten, so at most three tensors of
    u's size (and one of bools) live at once — the planner counts them (``leantune plan --optimizer quzo``)."""
    if bits is None:
        return u
    lo, hi = u.min(), u.max()
    step = ((hi - lo) / ((1 << bits) - 1)).clamp(min=torch.finfo(u.dtype).tiny)
    x = (u.sub_(lo) if inplace else u - lo).div_(step)
    return _round_levels(x, generator).mul_(step).add_(lo)


def _round_levels(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``⌊x⌋ + Bernoulli(x − ⌊x⌋)``, unbiased; x is consumed (overwritten by its fraction), so with the result and
    the uniform draw at most three tensors of x's size and one of bools live at once."""
    floor = torch.floor(x)
    fraction = x.sub_(floor)
    up = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < fraction
    del fraction
    return floor.add_(up)


class QuZO(torch.optim.Optimizer):
    """Zeroth-order optimizer (module docstring). ``lr`` η, ``eps`` ε, ``bits`` b of the perturbations (None: MeZO's
    full-precision Gaussian), ``queries`` n, ``weight_decay`` λ (decoupled, as MeZO), ``seed``."""

    def __init__(self, params: Iterable, lr: float = 1e-5, eps: float = 1e-3, bits: Optional[int] = 4,
                 queries: int = 1, weight_decay: float = 0.0, seed: int = 0, independent: bool = True,
                 weight_bits: Optional[int] = None) -> None:
        config = QuZOConfig(eps=eps, bits=bits, queries=queries, seed=seed,
                            weight_bits=weight_bits)  # checks each value, naming it
        if not (lr >= 0 and weight_decay >= 0):
            raise ValueError(f"QuZO: lr and weight_decay must be ≥ 0, got {lr} and {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.bits, self.queries, self.seed = config.eps, config.bits, config.queries, config.seed
        self.independent, self.weight_bits = independent, config.weight_bits
        self.last_mu: Optional[torch.Tensor] = None  # the μ_i of the last update, after the mean over ranks
        for group in self.param_groups:
            group.setdefault("step", 0)
        self._pending: Optional[torch.Tensor] = None  # Σ over micro-batches of μ_i, one entry per query

    @property
    def step_count(self) -> int:
        return int(self.param_groups[0]["step"])

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _direction(self, p: torch.Tensor, index: int, query: int, which: int) -> torch.Tensor:
        """u_{query} (which=0) or its rounding ``which`` ∈ {1, 2} for parameter ``index``, regenerated."""
        step = self.step_count
        gen = torch.Generator(device=p.device).manual_seed(_seed(self.seed, step, query, index, 0))
        u = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if which == 0:
            return u
        rounding = which if self.independent else 1
        gen.manual_seed(_seed(self.seed, step, query, index, rounding))
        return stochastic_round(u, self.bits, gen, inplace=True)

    @torch.no_grad()
    def _perturb(self, query: int, scale: float) -> None:
        for index, p in enumerate(self._params()):
            p.add_(self._direction(p, index, query, 1).to(p.dtype), alpha=scale)

    def _levels(self) -> int:
        return (1 << (self.weight_bits - 1)) - 1

    @torch.no_grad()
    def _onto_grid(self) -> None:
        """First step with ``weight_bits``: each tensor's step δ (kept in the state, so checkpoints carry it) and θ
        rounded to nearest onto its multiples."""
        for index, p in enumerate(self._params()):
            state = self.state[p]
            if "grid_step" in state:
                continue
            peak = float(p.detach().abs().max())
            if not peak > 0 or peak == float("inf"):
                raise ValueError(f"QuZO(weight_bits={self.weight_bits}): trained tensor {index} {tuple(p.shape)} is "
                                 f"{'all zero' if peak == 0 else 'not finite'}, so it has no grid (δ = max|θ| / "
                                 f"{self._levels()}); leave weight_bits=None for adapters that start at zero "
                                 "(LoRA's B), or train only tensors that already hold values.")
            # a Python float: load_state_dict would cast a tensor to the parameter's dtype (bf16) on resume
            step = state["grid_step"] = peak / self._levels()
            p.copy_((torch.round(p.float() / step) * step).to(p.dtype))

    @torch.no_grad()
    def estimate(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Two forward passes per query along ±ε u₁; adds μ to this step's estimate (call once per micro-batch);
        returns the loss at θ + ε u₁ of the first query (detached, for logging)."""
        if self.weight_bits is not None:
            self._onto_grid()
        mus, first = [], None
        for query in range(self.queries):
            self._perturb(query, self.eps)
            plus = closure().detach()
            self._perturb(query, -2 * self.eps)
            minus = closure().detach()
            self._perturb(query, self.eps)
            mus.append((upcast(plus) - upcast(minus)) / (2 * self.eps))  # float64 losses stay float64
            first = plus if first is None else first
        mu = torch.stack(mus).double().cpu()
        self._pending = mu if self._pending is None else self._pending + mu
        return first

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Apply ``θ ← θ − η(Σ_i μ_i u_{i,2}/n + λθ)`` from this step's estimate (``closure`` given: estimate first)."""
        loss = self.estimate(closure) if closure is not None else None
        if self._pending is None:
            raise RuntimeError("QuZO.step: no estimate for this step; pass a closure returning the loss, or call "
                               "estimate(closure) first (the Trainer integration does so in its training step).")
        mu = self._pending
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # mean over ranks' batches
            device = self._params()[0].device
            mu = mu.to(device)
            dist.all_reduce(mu, op=dist.ReduceOp.SUM)
            mu = (mu / dist.get_world_size()).cpu()
        self.last_mu = mu.clone()
        index = 0
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if self.weight_bits is not None:
                    self._grid_update(p, index, mu, lr, decay)
                    index += 1
                    continue
                if decay:
                    p.mul_(1 - lr * decay)
                for query in range(self.queries):
                    coefficient = -lr * float(mu[query]) / self.queries
                    p.add_(self._direction(p, index, query, 2).to(p.dtype), alpha=coefficient)
                index += 1
        for group in self.param_groups:
            group["step"] += 1
        self._pending = None
        return loss


    @torch.no_grad()
    def _grid_update(self, p: torch.Tensor, index: int, mu: torch.Tensor, lr: float, decay: float) -> None:
        """θ ← δ·clamp(SR(θ/δ + Δ/δ)) with Δ = −η(Σ_i μ_i u_{i,2}/n + λθ): the update stochastically rounded onto the
        grid (module docstring); θ/δ is rounded first, which removes the float drift the ±ε probes leave."""
        step = float(self.state[p]["grid_step"])
        work = torch.promote_types(p.dtype, torch.float32)
        # in grid units, in place (one tensor of θ's size besides a direction's): θ/δ + Δ/δ = (θ/δ)(1 − ηλ) − Σ …
        target = p.to(work, copy=True).div_(step).round_()
        if decay:
            target.mul_(1 - lr * decay)
        for query in range(self.queries):
            coefficient = -lr * float(mu[query]) / self.queries / step
            target.add_(self._direction(p, index, query, 2).to(work), alpha=coefficient)
        gen = torch.Generator(device=p.device).manual_seed(_seed(self.seed, self.step_count, 0, index, 3))
        p.copy_(_round_levels(target, gen).clamp_(-self._levels(), self._levels()).mul_(step))


@dataclass
class QuZOConfig:
    """Options of :class:`QuZO` for ``LeanTuneCallback(optimizer=QuZOConfig(...))`` (the learning rate, schedule and
    weight decay come from ``TrainingArguments``). Defaults: the QuZO LLaMA-2 LoRA recipe's ε = 2e-3 is close to
    MeZO's 1e-3; 4-bit perturbations; one query; ``weight_bits=None`` (weights in their dtype; 8 holds the trained
    tensors on QuZO's INT8 grid, module docstring)."""

    eps: float = 1e-3
    bits: Optional[int] = 4
    queries: int = 1
    seed: int = 0
    weight_bits: Optional[int] = None

    def __post_init__(self) -> None:
        check_number(self, "eps", minimum=0, strict=True)
        check_int(self, "bits", minimum=1, maximum=16, optional=True)
        check_int(self, "weight_bits", minimum=2, maximum=16, optional=True)
        check_int(self, "queries", minimum=1)
        check_int(self, "seed", minimum=0)

    @property
    def name(self) -> str:
        return "quzo"


def _zeroth_order_training_step(self, model, inputs, num_items_in_batch=None):
    """Trainer.training_step without backward: QuZO's two forward passes (eval mode: dropout off, so both see the
    same function), each loss scaled as Trainer scales it before backward; the update happens in optimizer.step()."""
    model.eval()
    inputs = self._prepare_inputs(inputs)
    scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def closure() -> torch.Tensor:
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer wraps it
    loss = optimizer.estimate(closure)
    model.train()
    return loss


def install_in_trainer(trainer: Any, config: QuZOConfig) -> QuZOConfig:
    """Make ``trainer`` train with QuZO (module docstring); call before ``trainer.train()``."""
    if getattr(trainer, "optimizer", None) is not None:
        raise RuntimeError("QuZO: the Trainer already has an optimizer; remove it (optimizers=) so QuZO can be built.")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError("QuZO perturbs every trained parameter in place from a seed; sharded parameters (FSDP2, "
                         "DeepSpeed ZeRO) are not supported: use DDP or one process (QuZO needs only inference "
                         "memory, so a model that runs inference on one GPU trains).")
    # weight decay: Trainer's param groups carry args.weight_decay
    kwargs = dict(lr=trainer.args.learning_rate, eps=config.eps, bits=config.bits, queries=config.queries,
                  seed=config.seed, weight_bits=config.weight_bits)
    trainer.optimizer_cls_and_kwargs = (QuZO, kwargs)
    one_bnb_cpu_path(trainer.model)  # the eval-mode forwards must compute what training computes, on every CPU
    trainer.args.max_grad_norm = 0.0  # there are no gradients to clip
    trainer.training_step = types.MethodType(_zeroth_order_training_step, trainer)
    return config


__all__ = ["QuZO", "QuZOConfig", "install_in_trainer", "stochastic_round"]
