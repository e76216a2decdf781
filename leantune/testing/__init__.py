"""Checks shared by the test suite and the benchmarks (as ``transformers.testing_utils``): the support matrix's
cells, each run the way a user runs it (:mod:`.support_matrix`). Not imported by ``import leantune``."""
