"""Scripts run as ``python benchmarks/x.py`` / ``python recipes/x.py`` put their folder first on ``sys.path``, so a
script named like an installed module hides it from everything they import. ``benchmarks/kernels.py`` did: once
transformers (5.x) imported the ``kernels`` package, 7 of the 11 benchmarks failed at import on a fresh install
(``ImportError: cannot import name 'CUDAProperties' from 'kernels'``). No script may shadow an installed module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("benchmarks", "recipes") for p in (ROOT / folder).glob("*.py")
                 if p.name != "__init__.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_script_shadows_an_installed_module(script):
    spec = importlib.util.find_spec(script.stem)
    assert spec is None or Path(spec.origin or "").resolve() == script.resolve(), \
        f"{script.relative_to(ROOT)} hides the installed module {script.stem!r} ({spec.origin}) from the scripts there"
