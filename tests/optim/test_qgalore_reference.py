"""leantune's Q-GaLore against the authors' package, q-galore-torch 1.0, where it runs on a CPU.

Its optimizer step does not run here as shipped (``KeyError: 'percentile_clipping'`` in bitsandbytes 0.50's 8-bit
update, then ``torch.cuda.synchronize``), so the comparison is of the parts that do: the quantizer (their min/max
scheme = ``quantize(..., scheme="minmax")`` bit for bit), the projection (their SVD basis = ours with LAPACK's signs),
and the lazy refresh schedule, where the two differ on purpose (``lazy_projector.py``: the interval counts from the
last refresh, not ``step % interval``)."""

from __future__ import annotations

import pytest
import torch

from leantune.kernels.quantize import quantize
from leantune.optim import QGaLoreAdamW

qgalore = pytest.importorskip("q_galore_torch.q_galore_projector")  # pinned in the test extra: always there


def test_minmax_quantizer_equals_theirs():
    torch.manual_seed(0)
    P = torch.linalg.qr(torch.randn(256, 16)).Q.t().contiguous()  # a 16 × 256 right projector
    theirs = qgalore.GaLoreProjector(rank=16, quant=True, group_size=256, n_bit=4)
    codes, scales, zeros, _ = theirs._quantize(P, q_group_size=256, n_bit=4)
    ours, ours_sz = quantize(P, 4, 256, scheme="minmax")
    assert torch.equal(ours, codes.reshape(-1))
    assert torch.equal(ours_sz[:, 0], scales.reshape(-1)) and torch.equal(ours_sz[:, 1], zeros.reshape(-1))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)], ids=["right", "left"])
def test_projection_equals_theirs_unquantized(shape):
    """With the projector unquantized and LAPACK's signs, R = project(G) is theirs bit for bit."""
    torch.manual_seed(1)
    G = torch.randn(shape)
    theirs = qgalore.GaLoreProjector(rank=8, update_proj_gap=10, scale=0.25)
    R_theirs = theirs.project(G, 0)
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = QGaLoreAdamW([{"params": [w], "rank": 8, "update_proj_gap": 10, "svd_signs": "lapack"}], proj_bits=None)
    group = opt.param_groups[0]
    projector = opt.projector_for(opt.state[w], group, w)
    projector.refresh(G, 0)
    assert torch.equal(projector.project(G), R_theirs)


def test_lazy_schedules_theirs_and_ours_on_a_constant_subspace():
    """T = 10, the same gradient every step (|cos| = 1 at every refresh). Theirs (``step % interval``) refreshes at
    0…60 then 80, 160, 320: the first interval after a doubling is still the old one (60 comes 10 after 50), then
    each refresh lands on a multiple of the new interval. Ours counts from the last refresh: 50 + 20 = 70, 70 + 40 =
    110, 110 + 80 = 190, 190 + 160 = 350."""
    torch.manual_seed(2)
    G = torch.randn(64, 32)
    theirs = qgalore.GaLoreProjector(rank=4, update_proj_gap=10)
    their_steps = []
    for step in range(400):
        before = theirs.svd_count
        theirs.project(G, step)
        if theirs.svd_count > before:
            their_steps.append(step)
    assert their_steps == [0, 10, 20, 30, 40, 50, 60, 80, 160, 320]

    w = torch.nn.Parameter(torch.zeros(64, 32))
    opt = QGaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 10}], lr=0.0)
    our_steps = []
    for step in range(400):
        before = opt.state[w].get("svd_count", 0)
        w.grad = G.clone()
        opt.step()
        if opt.state[w]["svd_count"] > before:
            our_steps.append(step)
    assert our_steps == [0, 10, 20, 30, 40, 50, 70, 110, 190, 350]
