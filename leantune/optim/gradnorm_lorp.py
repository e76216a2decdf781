"""GradNormLoRP: gradient- and weight-normalized low-rank projection (Huang et al., AAAI 2025, arXiv 2412.19616).

Each targeted W ∈ R^{m×n} ([out, in]) is trained in weight-normalized form, one magnitude per output row:

    W = g ⊙ V / ‖V‖_row          g ∈ R^m (magnitude), V ∈ R^{m×n} (direction), ĥ_i = v_i / ‖v_i‖ = w_i / g_i
    ∇g_i = ĥ_i · ∇w_i                                     (exact weight-norm gradients from ∇W)
    ∇v_i = (g_i / ‖v_i‖) (∇w_i − (ĥ_i · ∇w_i) ĥ_i)
    D̃    = back(ρ(project(∇V)))     ρ = Adam on the projection; projector refreshed every T steps on ∇V:
            one-sided GaLore (r × max(m, n), default) or the paper's two-sided U_r ρ(U_rᵀ ∇V V_r) V_rᵀ
            (``projector="svd2"``, r × r moments)
    V ← V − η_t D̃,   g ← g − η_t Adam(∇g) (decoupled weight decay on g),   W ← g ⊙ V / ‖V‖_row

The model is not modified: the optimizer keeps g and ν = ‖V‖_row (fp32, m each) and recovers V = ν ⊙ W / g, so
no copy of the weight is stored (the official code keeps one) and the forward pass is unchanged at the start
(g = ν = ‖W‖_row). State per matrix: GaLore's (2·r·max(m, n) + r·min(m, n), or 8-bit) + 4m. Other parameters get
AdamW (the official code weight-normalizes them too). Weight decay acts on the magnitude g only: decaying V would
not change W. A zero row (g = 0, e.g. LoRA's B at init) has no direction: it takes ĥ = ∇w/‖∇w‖ (‖V‖ = 1) at that
step, so its magnitude moves it along the steepest descent direction; from then on ĥ = w/g again.
"""

from __future__ import annotations

from typing import Any

import torch

from leantune._utils import upcast
from leantune.optim.base import LowRankOptimizer
from leantune.optim.galore_adamw import GaLoreAdamW, adam_normalize, apply_update
from leantune.optim.galore_adamw8bit import GaLoreAdamW8bit
from leantune.optim.step import ParamStep

WN_KEYS = ("wn_g", "wn_nu", "wn_g_exp_avg", "wn_g_exp_avg_sq")


def weight_norm_grads(W: torch.Tensor, grad: torch.Tensor, g: torch.Tensor, nu: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(∇g, X, a, zero-row directions) in fp32 (fp64 for fp64) for W = g ⊙ V/‖V‖_row, ‖V‖_row = ``nu``, with
    ∇V = diag(a) X.

    With ĥ = W/g: ∇g = (W·∇W)_row / g, X = ∇W − diag(∇g/g) W (each row of ∇W minus its component along ĥ: one
    pass, no ĥ materialized) and a = g/ν; the row scale a is left to the projection, where it costs an m × r product
    (R = project(diag(a) X)) instead of a full m × n pass. A zero row (g = 0) takes ĥ = ∇w/‖∇w‖, so ∇g = ‖∇w‖ and
    ∇V = 0 there (a = 0); the fourth value holds those ĥ rows (None when there is no zero row, the usual case).
    """
    Wf, Gf = upcast(W), upcast(grad)
    zero = g == 0
    safe_g = torch.where(zero, torch.ones_like(g), g)
    grad_g = torch.linalg.vecdot(Wf, Gf, dim=1) / safe_g
    steepest = None
    if bool(zero.any()):  # e.g. LoRA's B at init
        rows = Gf[zero]
        norms = torch.linalg.vector_norm(rows, dim=1)
        grad_g[zero] = norms
        steepest = rows / norms.clamp_min(torch.finfo(norms.dtype).tiny)[:, None]
    # zero rows: W_i = 0 adds nothing to X_i, and a_i = 0
    X = torch.addcmul(Gf, Wf, torch.where(zero, torch.zeros_like(g), -grad_g / safe_g)[:, None])
    return grad_g, X, g / nu, steepest


class GradNormLoRPAdamW(GaLoreAdamW):
    """GradNormLoRP with Adam moments (module docstring); args as GaLoreAdamW's."""

    row_shardable = False  # its update needs statistics across all rows of R (refused under FSDP2)

    state_keys = LowRankOptimizer.state_keys + WN_KEYS
    fusable = False

    @staticmethod
    def _magnitudes(p: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, ‖V‖_row): the stored ones, or at the first step ‖W‖_row for both (1 for a zero row's ‖V‖)."""
        if "wn_g" in state:
            return state["wn_g"], state["wn_nu"]
        norms = torch.linalg.vector_norm(upcast(p), dim=1)
        return norms, torch.where(norms > 0, norms, torch.ones_like(norms))

    def projection_source(self, p, grad, state, group) -> torch.Tensor:
        _, X, a, _ = weight_norm_grads(p, grad, *self._magnitudes(p, state))
        return X.mul_(a[:, None]).to(grad.dtype)  # ∇V, the subspace's source at a refresh

    def update(self, s: ParamStep) -> None:
        if s.P is None:
            return super().update(s)  # plain AdamW
        p, grad, state, group, projector = s.W, s.G, s.state, s.group, s.P
        g, nu = self._magnitudes(p, state)
        grad_g, X, a, steepest = weight_norm_grads(p, grad, g, nu)
        R = self.project(projector, X.to(grad.dtype), rows=a, shard=s.shard)  # project(∇V); a non-finite R skips the parameter
        del X
        if "wn_g" not in state:
            state["wn_g"], state["wn_nu"] = g, nu
            state["wn_g_exp_avg"], state["wn_g_exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
        state["step"] += 1
        N, step_size = self.direction(R, state, group, s.shard)  # ρ: Adam (or 8-bit Adam) on the projected ∇V
        zero = g == 0
        if steepest is not None:  # a zero row has no V = (ν/g) W to recover: form V and take its direction there
            V = upcast(p) * (nu / torch.where(zero, torch.ones_like(g), g))[:, None]
            V[zero] = nu[zero][:, None] * steepest
            rows, to_nu, sign = None, torch.ones_like(g), torch.ones_like(g)
        else:  # V' = (ν/g) U with U = W − η_t diag(g/ν) back(N); so ‖V'‖ = (ν/|g|)‖U‖ and W' = g' V'/‖V'‖ =
            # g' sign(g) U/‖U‖ (g < 0 after crossing zero, e.g. a LoRA B row's first step): V is never formed
            V = upcast(p)  # p itself in fp32 / fp64 (updated in place), a fp32 copy of 16-bit weights
            rows, to_nu, sign = a, nu / g.abs(), torch.sign(g)  # before g moves
        if V.dtype == N.dtype:
            projector.add_back(V, N, alpha=-step_size, rows=rows)  # one GEMM into V, row scale in the factor
        elif rows is None:  # 16-bit moments, fp32 direction
            V.sub_(upcast(projector.project_back(N)), alpha=step_size)
        else:
            V.addcmul_(upcast(projector.project_back(N)), rows[:, None], value=-step_size)
        beta1, beta2 = group["betas"]
        state["wn_g_exp_avg"].mul_(beta1).add_(grad_g, alpha=1.0 - beta1)
        state["wn_g_exp_avg_sq"].mul_(beta2).addcmul_(grad_g, grad_g, value=1.0 - beta2)
        N_g, g_step_size = adam_normalize(state["wn_g_exp_avg"], state["wn_g_exp_avg_sq"], state["step"], group)
        apply_update(g, N_g, g_step_size, group)  # g ← g − η_t Adam(∇g), decoupled decay on g
        norms = torch.linalg.vector_norm(V, dim=1)
        nu.copy_(norms * to_nu)  # ‖V'‖
        row = torch.where(norms > 0, g * sign / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(g))
        if V is p:
            p.mul_(row[:, None])  # W = g ⊙ V/‖V‖
        elif V.dtype == p.dtype:
            torch.mul(V, row[:, None], out=p)
        else:
            p.copy_(V.mul_(row[:, None]))


class GradNormLoRPAdamW8bit(GradNormLoRPAdamW, GaLoreAdamW8bit):
    """GradNormLoRP whose projected direction moments are 8-bit blockwise (bitsandbytes; torch-style Adam). The
    magnitude's moments (m values) stay fp32."""

    state_keys = GaLoreAdamW8bit.state_keys + WN_KEYS
