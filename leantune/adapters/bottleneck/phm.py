"""PHM layer: a linear map whose weight is a sum of Kronecker products.

Zhang et al., "Beyond Fully-Connected Layers with Quaternions" (ICLR 2021); as used by Compacter
(Karimi Mahabadi et al., NeurIPS 2021)::

    H = Σ_{i=1..n} S_i ⊗ W_i        S_i ∈ R^{n×n} (the "rule"),  W_i ∈ R^{(in/n)×(out/n)}
    y = x H + b                     H ∈ R^{in×out}  (x @ H, not x @ Hᵀ)
    Compacter: W_i = s_i t_iᵀ (rank 1, "fast", per layer), S shared by all layers ("slow")

Parameters per layer: ``n·(in/n + out/n)·rank + out`` (factorised) or ``in·out/n + out`` (full W_i),
plus ``n³`` for the rule when the layer owns it. Init follows the official Compacter code: each
``W_i`` factor (or full ``W_i``) is xavier-uniform with gain √2 ("glorot-uniform"), an own rule is
N(0, 0.01), the bias is zero. (AdapterHub, through a bug, uses xavier-normal with gain 1.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

OWN_RULE_STD = 0.01


def kronecker_sum(rule: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i kron(rule[i], weights[i])`` for ``rule`` (n, n, n) and ``weights`` (n, p, q) → (n·p, n·q)."""
    n, p, q = weights.shape
    # kron(S, W)[a·p + c, b·q + d] = S[a, b] · W[c, d]
    return torch.einsum("iab,icd->acbd", rule, weights).reshape(n * p, n * q)


class PHMLinear(nn.Module):
    """``y = x H + b`` with ``H = Σ_i S_i ⊗ W_i``; see the module docstring.

    Args:
        in_features / out_features: must both be divisible by ``n``.
        n: number of Kronecker terms (the "hypercomplex dimension").
        rank: rank of each ``W_i`` (``W_i = W_left[i] @ W_right[i]``); ``None`` learns full ``W_i``.
        own_rule: create a rule parameter here; otherwise the caller passes the (shared) rule to ``forward``.
        bias: learn an additive bias.
        name: used in error messages.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        rank: Optional[int] = 1,
        own_rule: bool = False,
        bias: bool = True,
        name: str = "PHMLinear",
    ) -> None:
        super().__init__()
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size % n:
                raise ValueError(
                    f"{name}: {what}={size} is not divisible by the PHM dimension n={n}; choose phm_dim dividing "
                    f"both the hidden size and the bottleneck size (hidden / reduction_factor)."
                )
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        p, q = in_features // n, out_features // n
        gain = math.sqrt(2.0)
        if rank is None:
            self.W = nn.Parameter(torch.empty(n, p, q))
            for i in range(n):
                nn.init.xavier_uniform_(self.W[i], gain=gain)
        else:
            self.W_left = nn.Parameter(torch.empty(n, p, rank))
            self.W_right = nn.Parameter(torch.empty(n, rank, q))
            for i in range(n):
                nn.init.xavier_uniform_(self.W_left[i], gain=gain)
                nn.init.xavier_uniform_(self.W_right[i], gain=gain)
        self.rule = nn.Parameter(torch.randn(n, n, n) * OWN_RULE_STD) if own_rule else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weights(self) -> torch.Tensor:
        """The ``W_i`` as one (n, in/n, out/n) tensor."""
        return self.W if self.rank is None else self.W_left @ self.W_right

    def kron_weight(self, rule: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``H`` (in×out) for the given rule (the layer's own one if ``None``)."""
        rule = self._rule(rule)
        return kronecker_sum(rule.to(self.weights().dtype), self.weights())

    def _rule(self, rule: Optional[torch.Tensor]) -> torch.Tensor:
        if rule is None:
            if self.rule is None:
                raise ValueError("This PHMLinear has no rule of its own; pass the shared rule to forward().")
            return self.rule
        if rule.shape != (self.n, self.n, self.n):
            raise ValueError(f"PHM rule must have shape {(self.n,) * 3}, got {tuple(rule.shape)}.")
        return rule

    def forward(self, x: torch.Tensor, rule: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = x @ self.kron_weight(rule).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n={self.n}, rank={self.rank}, own_rule={self.rule is not None}"
