"""Sign orientation of SVD bases (``leantune.optim.svd``) against its definition, in float64 by hand."""

from __future__ import annotations

import pytest
import torch

from leantune.optim.svd import ALIGN_MIN, canonical_pairs, canonical_signs, orient_basis, orientation


def _basis(rows: int, cols: int, seed: int) -> torch.Tensor:
    """An r × n matrix with orthonormal rows."""
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.t().contiguous()


def test_canonical_signs_make_each_largest_entry_positive():
    P = torch.tensor([[0.1, -0.9, 0.2], [0.5, 0.4, -0.3], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert canonical_signs(P, dim=1).tolist() == [-1.0, 1.0, 1.0]  # a zero vector keeps +1
    assert canonical_signs(P.t(), dim=0).tolist() == [-1.0, 1.0, 1.0]  # the same vectors as columns


@pytest.mark.parametrize("right", [True, False])
def test_orientation_undoes_any_sign_flip_exactly(right):
    """For a given subspace the oriented basis does not depend on the signs LAPACK chose: bit for bit."""
    P = _basis(4, 12, 0)
    P = P if right else P.t().contiguous()
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    flipped = P * (flips[:, None] if right else flips[None, :])
    for old in (None, P + 1e-3 * _basis(4, 12, 1).reshape(P.shape)):
        a = orient_basis(P.clone(), old, right)
        b = orient_basis(flipped.clone(), old, right)
        assert torch.equal(a, b)


def test_alignment_follows_the_previous_basis_and_new_vectors_take_canonical_signs():
    old = _basis(3, 10, 2)
    new = old.clone()
    new[0] *= -1  # the same direction, flipped: aligned back to the old sign
    new[1] = -_basis(3, 10, 3)[0]  # a vector unrelated to old[1]: overlap decides while it is not tiny
    new[2] = old[2] * -1
    dots = (old * new).sum(1)
    expected = torch.where(dots.abs() >= ALIGN_MIN, dots.sign(), canonical_signs(new, 1))
    assert torch.equal(orientation(new, old, right=True), expected)
    assert orientation(new, old, right=True)[[0, 2]].tolist() == [-1.0, -1.0]
    # an overlap below ALIGN_MIN is no continuation: canonical sign
    orth = old.clone()
    orth[0] = torch.linalg.qr(torch.cat([old, torch.randn(1, 10, dtype=torch.float64)]).t())[0].t()[3]
    assert abs(float((orth[0] * old[0]).sum())) < ALIGN_MIN
    assert orientation(orth, old, right=True)[0] == canonical_signs(orth, 1)[0]


def test_canonical_pairs_keep_the_product_and_fix_the_signs():
    A = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    D = torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    a = canonical_pairs(U, Vh, 3)
    b = canonical_pairs(U * D, D[:, None] * Vh, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0] * S[:3] @ a[1], U[:, :3] * S[:3] @ Vh[:3], rtol=0, atol=1e-12)
    assert bool((canonical_signs(a[0], 0) > 0).all())


CASES = [("GaLoreAdamW", "svd", "keep"), ("GaLoreAdamW", "svd", "rotate"), ("GaLoreAdamW", "rsvd", "keep"),
         ("FiraAdamW", "svd", "keep"), ("NaturalGaLoreAdamW", "svd", "rotate"), ("GaLoreAdafactor", "svd", "keep"),
         ("GradNormLoRPAdamW", "svd2", "keep"), ("GradNormLoRPAdamW", "svd", "keep")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_training_does_not_depend_on_the_svd_signs(monkeypatch, case, dtype):
    """Every SVD-based optimizer and policy trains bit for bit the same with LAPACK's signs and with the signs
    scrambled (a valid SVD with other signs), in fp32 and bf16; with ``svd_signs="lapack"`` it does not (the test
    can fail: the scramble changes raw-sign runs)."""
    import leantune.optim as optim
    import leantune.optim.svd as svd
    from tests.machine import scrambled_signs, scrambling
    from tests.optim.helpers import batches, galore_groups, loss_fn, make_net

    name, projector, policy = case

    def run(scramble: bool, signs: str | None = None):
        monkeypatch.setattr(svd, "sign_hook", scrambled_signs if scramble else None)
        if scramble and signs == "lapack":  # raw signs bypass the hook: scramble LAPACK itself
            monkeypatch.setattr(torch.linalg, "svd", scrambling(torch.linalg.svd))
        model = make_net().to(dtype)
        groups = galore_groups(model, rank=4, update_proj_gap=3, scale=0.25, projector=projector,
                               moment_policy=policy, **({"svd_signs": signs} if signs else {}))
        extra = {"beta1": 0.9} if name == "GaLoreAdafactor" else {}  # its first moment lives in the basis
        opt = getattr(optim, name)(groups, lr=1e-2, **extra)
        for xy in batches(8):
            loss_fn(model, tuple(t.to(dtype) for t in xy)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()]

    plain, scrambled_run = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, scrambled_run))
    if policy != "reset" and projector != "svd2":  # raw signs + kept/rotated moments: the scramble shows
        raw_plain, raw_scrambled = run(False, "lapack"), run(True, "lapack")
        assert not all(torch.equal(a, b) for a, b in zip(raw_plain, raw_scrambled))


def test_conda_does_not_depend_on_the_svd_signs(monkeypatch):
    """Conda rotates into the full singular basis Q of its first moment: N Q is unchanged by any sign flip of Q's
    vectors (V is accumulated from squares), bit for bit."""
    import leantune.optim.svd as svd
    from leantune.optim import CondaAdamW
    from tests.machine import scrambled_signs
    from tests.optim.helpers import batches, galore_groups, loss_fn, make_net

    def run(hook):
        monkeypatch.setattr(svd, "sign_hook", hook)
        model = make_net()
        opt = CondaAdamW(galore_groups(model, rank=None, update_proj_gap=3), lr=1e-2)
        for xy in batches(8):
            loss_fn(model, xy).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(None), run(scrambled_signs)))
