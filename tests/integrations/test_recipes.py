"""The notebook's code cells run top to bottom (with few steps) and its merged model agrees with the adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_notebook_runs(tmp_path, monkeypatch, capsys):
    notebook = json.loads((REPO / "recipes" / "quickstart.ipynb").read_text())
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LEANTUNE_NOTEBOOK_STEPS", "6")
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "merged model accuracy:" in out
    adapter_acc = float(out.split("test accuracy:")[1].split()[0])
    merged_acc = float(out.split("merged model accuracy:")[1].split()[0])
    assert abs(adapter_acc - merged_acc) < 1e-6
    assert (REPO / "runs" / "notebook" / "lora" / "adapter_config.json").is_file()
    assert os.environ["LEANTUNE_NOTEBOOK_STEPS"] == "6"
