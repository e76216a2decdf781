"""The documentation site builds with ``mkdocs build --strict`` — no broken link, no missing mkdocstrings reference,
no benchmark table that its page names but the benchmark did not write — and prints nothing. (The docstring
examples run as doctests through pytest's ``--doctest-modules``, pyproject.toml.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2.0 on every run
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_site_builds_strict_and_quiet(tmp_path):
    result = _build(tmp_path, ROOT / "mkdocs.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
    for page in ("methods/optimizers/galore_adamw", "methods/adapters/lora_xs", "architecture", "support-matrix"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page


def test_strict_build_fails_on_a_broken_link_and_a_missing_table(tmp_path):
    """The check can fail: a page with a dead link, and one naming a benchmark table that does not exist."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n[dead](nope.md)\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"site_name: x\ndocs_dir: {docs}\nstrict: true\n")
    assert _build(tmp_path, config).returncode != 0
    (docs / "index.md").write_text("# x\n\n<!-- table: benchmarks/results/nope.md#1 -->\n")
    config.write_text(f"site_name: x\ndocs_dir: {docs}\nstrict: true\nhooks:\n  - {ROOT / 'docs' / 'hooks.py'}\n"
                      "nav:\n  - Home: index.md\n  - Methods:\n      - x: index.md\n")
    result = _build(tmp_path, config)
    assert result.returncode != 0 and "nope.md" in result.stdout + result.stderr


def _tables(text: str) -> list[str]:
    out, current = [], []
    for line in text.split("\n") + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    return out


def test_readme_is_short_and_its_headline_table_is_the_benchmark_output():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    plan_7b = _tables((ROOT / "benchmarks" / "results" / "plan_7b.md").read_text())[0]
    assert plan_7b in _tables(readme)


def test_readme_links_resolve():
    import re

    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#]+)", readme) if not t.startswith("http")]
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]
