"""Fuzz pass over every ``leantune`` subcommand and option parser: damaged or unexpected inputs give one
``leantune: error:`` line on stderr, exit code 2, nothing on stdout and nothing written — every time. And a successful
command, run as a user runs it (a process of its own, ``kernels`` and bitsandbytes installed), writes nothing to
stderr."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from leantune.cli import main
from tests.adapters.models import adapt, tiny_model

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"


def _truncate(fraction: float):
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return damage


def _header(header) -> callable:
    """Replace the safetensors header by ``header`` (JSON), keeping the data."""
    def damage(path: Path) -> None:
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    return damage


def _retype(path: Path) -> None:
    tensors = load_file(path)
    save_file({k: (v * 1000).to(torch.int32) for k, v in tensors.items()}, path)


def _config(change) -> callable:
    def damage(path: Path) -> None:
        config = path.parent / "adapter_config.json"
        config.write_text(change(json.loads(config.read_text())))
    return damage


#: what can be wrong with an adapter folder (applied to its weights file; some rewrite the config beside it)
ADAPTER_DAMAGE = {
    "weights truncated to half": _truncate(0.5),
    "weights truncated to 5 bytes": _truncate(5 / 10**9),
    "weights empty": _truncate(0.0),
    "weights garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "header length beyond the file": lambda p: p.write_bytes(struct.pack("<Q", 2**40) + b"{}"),
    "header not JSON": lambda p: p.write_bytes(struct.pack("<Q", 6) + b"\xff\xfe{}{}"),
    "header a JSON list": _header([1, 2, 3]),
    "header entry without offsets": _header({"base_model.model.x.loraxs_R.default": {"dtype": "F32"}}),
    "header with an unknown dtype": _header({"base_model.model.x.loraxs_R": {"dtype": "Q7", "shape": [2],
                                                                            "data_offsets": [0, 8]}}),
    "integer weights": _retype,
    "weights file missing": lambda p: p.unlink(),
    "weights a directory": lambda p: (p.unlink(), p.mkdir()),
    "config not JSON": _config(lambda c: "{not json"),
    "config a JSON list": _config(lambda c: json.dumps([c])),
    "config without peft_type": _config(lambda c: json.dumps({k: v for k, v in c.items() if k != "peft_type"})),
    "config of an unknown method": _config(lambda c: json.dumps({**c, "peft_type": "NO_SUCH_METHOD"})),
    "config rank of the wrong type": _config(lambda c: json.dumps({**c, "r": "eight"})),
    "config missing": lambda p: (p.parent / "adapter_config.json").unlink(),
    "folder empty": lambda p: [f.unlink() for f in list(p.parent.iterdir())],
    "folder a file": lambda p: (shutil.rmtree(p.parent), p.parent.write_text("x")),
    "folder missing": lambda p: shutil.rmtree(p.parent),
}

BASE_DAMAGE = {
    "base empty": lambda d: [f.unlink() for f in list(d.iterdir())],
    "base config not JSON": lambda d: (d / "config.json").write_text("{"),
    "base config of an unknown model type": lambda d: (d / "config.json").write_text('{"model_type": "no_such"}'),
    "base weights truncated": lambda d: _truncate(0.5)(d / "model.safetensors"),
    "base missing": lambda d: shutil.rmtree(d),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_fuzz")
    base = tiny_model("llama")
    base.save_pretrained(root / "base")
    adapt(base, "lora_xs", "llama").save_pretrained(root / "adapter")
    return root


def _tree(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.is_dir(), p.stat().st_size if p.is_file() else 0,
                   p.stat().st_mtime_ns) for p in root.rglob("*"))


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(argv, root: Path, capsys) -> None:
    before = _tree(root)
    code, out, err = _run(argv, capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("leantune: error: ") and out == "", (argv, code, err)
    assert _tree(root) == before, f"{argv}: something was written"


def _case(originals: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    shutil.copytree(originals / "base", tmp_path / "base")
    shutil.copytree(originals / "adapter", tmp_path / "adapter")
    return tmp_path, tmp_path / "base", tmp_path / "adapter"


def _adapter_commands(base: Path, adapter: Path, out: Path) -> list[list[str]]:
    return [["inspect", str(adapter)], ["inspect", str(adapter), "--json"],
            ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)],
            ["export", str(adapter), "--to", "lora", str(out), "--base", str(base)],
            ["compress", str(adapter), str(out)]]


@pytest.mark.parametrize("damage", list(ADAPTER_DAMAGE))
def test_damaged_adapters_are_refused_by_every_subcommand(originals, tmp_path, capsys, damage):
    root, base, adapter = _case(originals, tmp_path)
    ADAPTER_DAMAGE[damage](adapter / WEIGHTS)
    for argv in _adapter_commands(base, adapter, root / "out"):
        _assert_refused(argv, root, capsys)


@pytest.mark.parametrize("damage", list(BASE_DAMAGE))
def test_damaged_base_models_are_refused(originals, tmp_path, capsys, damage):
    root, base, adapter = _case(originals, tmp_path)
    BASE_DAMAGE[damage](base)
    for argv in (["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(root / "out")],
                 ["export", str(adapter), "--to", "lora", str(root / "out"), "--base", str(base)],
                 ["compress", "--full", str(base), str(base), str(root / "out")],
                 ["profile", str(base)]):
        _assert_refused(argv, root, capsys)


def test_unusable_output_locations_are_refused(originals, tmp_path, capsys):
    root, base, adapter = _case(originals, tmp_path)
    (root / "a_file").write_text("user data")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("user data")
    outs = [root / "a_file", root / "a_file" / "inside", root / "full"]
    if Path("/proc/self").is_dir():
        outs.append(Path("/proc/leantune_cannot_write_here"))  # a read-only file system, even for root
    for out in outs:
        for argv in (["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)],
                     ["export", str(adapter), "--to", "lora", str(out), "--base", str(base)],
                     ["compress", str(adapter), str(out)]):
            _assert_refused(argv, root, capsys)


@pytest.mark.parametrize("argv", [
    ["plan", "{base}", "--adapter", "lora:r=8,no_such_option=1"],
    ["plan", "{base}", "--adapter", "lora:r=eight"],
    ["plan", "{base}", "--adapter", "lora:use_dora=1"],
    ["plan", "{base}", "--adapter", "lora_xs:r=8|9"],
    ["plan", "{base}", "--adapter", "lora:r"],
    ["plan", "{base}", "--adapter", "no_such_adapter:r=8"],
    ["plan", "{base}", "--adapter", "lora:r=100000"],
    ["plan", "{base}", "--optimizer", "galore_adamw:rank=8,bogus=1"],
    ["plan", "{base}", "--optimizer", "galore_adamw:rank=abc"],
    ["plan", "{base}", "--optimizer", "galore_adamw:moment_policy=sideways"],
    ["plan", "{base}", "--optimizer", "adamw:rank=3"],
    ["plan", "{base}", "--optimizer", "no_such_optimizer"],
    ["plan", "{base}", "--memory", "everything"],
    ["plan", "{base}", "--seq", "0"],
    ["plan", "{base}", "--seq", "many"],
    ["plan", "{base}", "--processes", "0"],
    ["plan", "{base}", "--gpu", "lots"],
    ["plan", "{base}", "--quant", "4bit"],
    ["plan", "{base}", "--dtype", "fp8"],
    ["plan", "{tmp}/nothing_here"],
    ["plan", "{tmp}/a_file"],
    ["plan", "{tmp}/bad_config"],
    ["plan", "{base}", "--search"],
    ["profile", "{tmp}/nothing_here"],
    ["profile", "{tmp}/bad_config"],
    ["profile", "{base}", "--memory", "everything"],
    ["profile", "{base}", "--batch-size", "0"],
    ["profile", "{base}", "--lora-rank", "-1"],
    ["compress", "{adapter}", "{tmp}/out", "--density", "2"],
    ["compress", "{adapter}", "{tmp}/out", "--density", "nan"],
    ["compress", "{adapter}", "{tmp}/out", "--scale", "big"],
    ["compress", "{adapter}"],
    ["compress", "--full", "{base}", "{base}", "{tmp}/o1", "{tmp}/o2"],
    ["export", "{adapter}", "--to", "gguf", "{tmp}/out"],
    ["inspect"],
    ["no_such_command"],
    [],
])
def test_bad_options_are_one_line(originals, tmp_path, capsys, argv):
    root, base, adapter = _case(originals, tmp_path)
    (root / "a_file").write_text("x")
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text('["not", "a", "config"]')
    _assert_refused([a.format(base=base, adapter=adapter, tmp=root) for a in argv], root, capsys)


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``leantune ARGS`` as a user runs it: its own process, stdin/stderr not a terminal, the installed packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "LEANTUNE_TEST"))}
    return subprocess.run([sys.executable, "-m", "leantune.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_successful_commands_write_nothing_to_stderr(originals, tmp_path):
    """Not even bitsandbytes' optional-kernel notice (it printed "Failed to load CPU gemm_4bit_forward …" on every
    command on CPUs with AVX512-BF16), nor a progress bar, nor a version-skew warning."""
    for args in (["--help"], ["inspect", str(originals / "adapter")],
                 ["merge", "--base", str(originals / "base"), "--adapter", str(originals / "adapter"), "--out",
                  str(tmp_path / "merged")],
                 ["plan", str(originals / "base"), "--adapter", "lora:r=4"]):
        result = _cli(*args)
        assert result.returncode == 0 and result.stderr == "", (args, result.stderr)
        assert result.stdout
    refused = _cli("inspect", str(tmp_path / "nothing_here"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and refused.stderr.startswith("leantune: error:")
