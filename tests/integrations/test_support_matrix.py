"""The support matrix through ``LeanTuneCallback`` + ``Trainer``, over a pairwise covering array of
adapter × memory × kernels × optimizer × dtype × architecture (every pair of values of any two factors is run; the
full product is ~8,600 cells). What each cell checks: ``leantune/testing/support_matrix.py``. ``python
benchmarks/support_matrix.py`` runs the same cells and writes the support-matrix table."""

from __future__ import annotations

import pytest

from leantune.testing.support_matrix import Cell, check, pairwise_cells

CELLS = pairwise_cells()


def expected_refusal(cell: Cell) -> str | None:
    """The documented refusals (a substring of the reason the callback gives at setup), None where it must work."""
    if cell.memory == "budget" and cell.arch == "t5":
        return "two (encoder and decoder)"  # the budget works on one stack of layers (checked before the optimizer)
    if cell.adapter in ("SLTrain", "LOST") and cell.arch == "gpt2":
        return "replaces plain nn.Linear weights"  # GPT-2's linears are transformers Conv1D
    if cell.adapter in ("NOLA", "Compacter", "Compacter++") and cell.optimizer not in ("adamw", "quzo") and \
            cell.arch != "bert":
        # NOLA trains 1-D coefficients, Compacter 3-D PHM factors and 1-D norms: a low-rank optimizer has nothing
        # to project (BERT: its new classification head is a trained linear, so there is; QuZO needs no matrix)
        return "trains no 2-D linear weight"
    return None


def test_the_array_covers_every_pair():
    import itertools

    from leantune.testing.support_matrix import FACTORS

    names = list(FACTORS)
    seen = {(a, getattr(c, a), b, getattr(c, b)) for c in CELLS for a, b in itertools.combinations(names, 2)}
    for a, b in itertools.combinations(names, 2):
        for va in FACTORS[a]:
            for vb in FACTORS[b]:
                assert (a, va, b, vb) in seen, (a, va, b, vb)


@pytest.mark.parametrize("cell", CELLS, ids=[c.key.replace(" | ", "-") for c in CELLS])
def test_cell_works_or_is_refused_at_setup(cell, tmp_path):
    status, detail = check(cell, tmp_path)
    reason = expected_refusal(cell)
    if reason is None:
        assert status == "ok", f"refused at setup: {detail}"
    else:
        assert status == "refused" and reason in detail, (status, detail)
