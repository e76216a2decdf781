"""Singular vectors whose signs do not depend on the machine: the one SVD call of leantune's optimizers.

A thin SVD G = U S Vᵀ is unique only up to the sign of each pair (u_i, v_i): (−u_i)(−v_i)ᵀ is the same term.
LAPACK picks the signs by the path its rounding takes, so a difference in the last bit of G (another thread count,
another GEMM kernel, another process count summing the gradient in another order) can flip them. An optimizer whose
state lives in the basis — GaLore's kept moments (``moment_policy="keep"``), their rotation (``"rotate"``, where
v ← |v T| is not sign-symmetric) — then carries moments written in the old signs into flipped vectors, and a 1e-19
difference in G becomes a different trajectory (the update changes by ~lr).

:func:`orient_basis` makes every new basis sign-consistent:

* first basis (no previous one): the canonical sign — each basis vector's entry of largest magnitude is positive
  (the convention of scikit-learn's ``svd_flip``);
* later bases: aligned with the previous basis, s_i = sign(⟨p_i^old, p_i^new⟩) = sign(diag(P_old P_newᵀ)), so that a
  kept moment means the same thing before and after a refresh; where |⟨p_i^old, p_i^new⟩| < ``ALIGN_MIN`` the vector
  is new (not a continuation) and gets the canonical sign.

Multiplying by ±1 is exact, so for a given subspace the result no longer depends on LAPACK's choice at all — bit for
bit (tested with :data:`sign_hook`, which hands the optimizers an adversarial but valid SVD). The reference packages
(galore-torch, fira) keep LAPACK's raw signs; ``reference_adam=True`` / ``reference_order=True`` does too, for bitwise
parity with them.
"""

from __future__ import annotations

from typing import Callable

import torch

#: below this |⟨p_old, p_new⟩| a basis vector is treated as new and takes the canonical sign
ALIGN_MIN = 1e-3

#: tests only: ``hook(A, U, Vh) -> (U, Vh)`` replaces the factors of every sign-oriented SVD (``raw=False``); the
#: test suite installs one that flips pairs by the last bits of A (``LEANTUNE_TEST_SVD_SIGNS=scramble``)
sign_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def thin_svd(A: torch.Tensor, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(A, full_matrices=False)``; unless ``raw``, the factors pass through :data:`sign_hook`
    (callers that use them orient them with :func:`orient_basis` or are invariant to the signs)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if not raw and sign_hook is not None:
        U, Vh = sign_hook(A, U, Vh)
    return U, S, Vh


def canonical_signs(basis: torch.Tensor, dim: int) -> torch.Tensor:
    """±1 per basis vector (vectors run along ``dim``): the sign of its entry of largest magnitude (+1 for a zero
    vector)."""
    idx = basis.abs().argmax(dim=dim, keepdim=True)
    signs = torch.gather(basis, dim, idx).sign().squeeze(dim)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def dots(old: torch.Tensor, new: torch.Tensor, right: bool) -> torch.Tensor:
    """⟨p_i^old, p_i^new⟩ per basis vector (rows when ``right``, else columns), in fp32 (fp64 for fp64 bases)."""
    acc = torch.float64 if new.dtype == torch.float64 else torch.float32
    return (old.to(acc) * new.to(acc)).sum(1 if right else 0)


def orientation(new: torch.Tensor, old: torch.Tensor | None, right: bool,
                overlap: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The ±1 per vector of ``new`` that orients it (module docstring); ``right``: the vectors are rows (P is r × n),
    else columns (P is m × r). ``overlap(old, new)``: ⟨p_i^old, p_i^new⟩ per vector, when ``old`` holds only part of
    each vector (FSDP2 rows); by default the sum over the whole vectors."""
    dim = 1 if right else 0
    acc = torch.float64 if new.dtype == torch.float64 else torch.float32
    canonical = canonical_signs(new.to(acc), dim)
    if old is None or (overlap is None and old.shape != new.shape):  # no previous basis of this shape
        return canonical
    overlaps = overlap(old, new) if overlap is not None else dots(old, new, right)
    return torch.where(overlaps.abs() >= ALIGN_MIN, overlaps.sign(), canonical)


def orient_basis(new: torch.Tensor, old: torch.Tensor | None, right: bool,
                 overlap: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``new`` with each basis vector multiplied by its :func:`orientation` sign, in place (the memory order of
    ``new`` is kept: it must be a tensor of its own, not a view of the SVD's factors)."""
    signs = orientation(new, old, right, overlap).to(new.dtype)
    return new.mul_(signs[:, None] if right else signs[None, :])


def canonical_pairs(U: torch.Tensor, Vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-r pairs ``(U[:, :r], Vh[:r])`` as new tensors, each pair's sign fixed by its left vector's largest
    entry (for factorizations whose result depends on the signs, e.g. restarts' B = U_r Σ^½, A = Σ^½ V_rᵀ)."""
    signs = canonical_signs(U[:, :r], 0).to(U.dtype)
    return U[:, :r] * signs[None, :], Vh[:r] * signs[:, None]
