"""Checkpoints that survive faults: a truncated, mistyped, misshaped or foreign adapter / optimizer checkpoint loads
with one named error and leaves the model (and the optimizer) as they were; a process killed while writing an
adapter, a merged model or an exported LoRA leaves the previous output intact."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import leantune
from leantune.adapters.tuner_base import check_checkpoint  # noqa: F401  (the tuners' load check)
from leantune.optim import OptimizerConfig, build_optimizer, load_optimizer, save_optimizer
from tests.adapters.models import make_config, perturb_adapter, tiny_model
from tests.optim.helpers import TallWideNet, batches, loss_fn

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["lora_xs", "nola", "allora"]
WEIGHTS = "adapter_model.safetensors"


def _saved_adapter(tmp_path, method="lora_xs", name="adapter") -> Path:
    model = get_peft_model(tiny_model("llama"), make_config(method, "llama"))
    perturb_adapter(model, 0.1)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _untouched(model, reference) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def _first_weight(tensors: dict) -> list:
    return [next((k, v) for k, v in sorted(tensors.items()) if v.is_floating_point() and v.dim() >= 1)]


def _rewrite(path: Path, change) -> None:
    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fault,message", [
    ("truncated", "truncated"),
    ("wrong_dtype", "not a floating-point weight"),
    ("wrong_shape", "different base model"),
    ("missing_tensor", "has no"),
    ("other_method", "another method"),
])
def test_bad_adapter_checkpoint_gives_one_named_error_and_leaves_the_model(tmp_path, method, fault, message):
    path = _saved_adapter(tmp_path, method)
    if fault == "truncated":
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(data[: len(data) * 2 // 3])
    elif fault == "wrong_dtype":
        _rewrite(path, lambda t: t.update({k: v.to(torch.int32) for k, v in _first_weight(t)}))
    elif fault == "wrong_shape":
        _rewrite(path, lambda t: t.update({k: torch.cat([v, v]) for k, v in _first_weight(t)}))
    elif fault == "missing_tensor":
        _rewrite(path, lambda t: t.pop(sorted(k for k in t if "alpha" in k or "_R" in k or "_A" in k)[0]))
    else:  # the weights of another method under this adapter_config.json
        other = _saved_adapter(tmp_path, "dylora", "other")
        (path / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    model = tiny_model("llama")
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(leantune.LeanTuneError, match=message):
        leantune.load_adapter(model, path)
    _untouched(model, reference)


def test_peft_from_pretrained_also_refuses_a_checkpoint_lacking_adapter_tensors(tmp_path):
    """Without leantune's loader, peft would load "successfully" and keep the missing tensor at its initial value."""
    path = _saved_adapter(tmp_path, "lora_xs")
    _rewrite(path, lambda t: t.pop(sorted(t)[0]))
    with pytest.raises(ValueError, match="checkpoint has no"):
        PeftModel.from_pretrained(tiny_model("llama"), str(path))


def _trained_optimizer(name="galore_adamw", hidden=40):
    torch.manual_seed(0)
    model = TallWideNet(hidden=hidden)
    opt = build_optimizer(model, OptimizerConfig(name, rank=4, update_proj_gap=2, lr=1e-2, target_modules=[
        "up", "mid", "down"], optimizer_kwargs={"min_8bit_size": 64} if name == "galore_adamw8bit" else {}))
    for xy in batches(3):
        loss_fn(model, xy).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _optimizer_snapshot(opt):
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("fault,error,message", [
    ("truncated", leantune.LeanTuneError, "cannot read the optimizer checkpoint"),
    ("other_model", ValueError, "has shape .* needs"),
    ("other_optimizer", ValueError, "from another optimizer"),
    ("non_finite", ValueError, "holds NaN/inf"),
])
def test_bad_optimizer_checkpoint_gives_one_named_error_and_leaves_the_optimizer(tmp_path, fault, error, message):
    _, source = _trained_optimizer("galore_adamw8bit" if fault == "other_optimizer" else "galore_adamw",
                                   hidden=48 if fault == "other_model" else 40)
    path = save_optimizer(source, tmp_path / "optimizer.pt")
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif fault == "non_finite":
        state = torch.load(path, weights_only=True)
        next(v for s in state["state"].values() for k, v in s.items() if k == "exp_avg").fill_(float("nan"))
        torch.save(state, path)
    _, target = _trained_optimizer("galore_adamw")
    before = _optimizer_snapshot(target)
    with pytest.raises(error, match=message):
        load_optimizer(target, path)
    after = target.state_dict()
    for pid, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][pid][key], value) if isinstance(value, torch.Tensor) else \
                after["state"][pid][key] == value


CHILD = r'''
import os, sys, time, torch
import safetensors.torch as st
import leantune, transformers, peft.peft_model
from peft import get_peft_model
sys.path.insert(0, {root!r})
from tests.adapters.models import make_config, perturb_adapter, tiny_model
out, job, marker = {out!r}, {job!r}, {marker!r}
real = st.save_file

def slow_save(tensors, filename, metadata=None):  # writes a few bytes, signals, then hangs: the parent kills us
    with open(filename, "wb") as f:
        f.write(b"partial")
    open(marker, "w").close()
    time.sleep(120)

for module in (st, transformers.modeling_utils, peft.peft_model):
    for attr in ("save_file", "safe_save_file"):
        if hasattr(module, attr):
            setattr(module, attr, slow_save)
model = get_peft_model(tiny_model("llama"), make_config("lora_xs", "llama"))
perturb_adapter(model, 0.2, seed=11)  # a different adapter than the one already in `out`
if job == "save":
    leantune.save_adapter(model, out)
else:
    tmp = out + ".src"
    st.save_file = real; peft.peft_model.safe_save_file = real
    model.save_pretrained(tmp)
    tiny_model("llama").save_pretrained(tmp + ".base")
    st.save_file = slow_save; peft.peft_model.safe_save_file = slow_save; transformers.modeling_utils.safe_save_file = slow_save
    if job == "merge":
        leantune.merge_to_directory(tmp + ".base", tmp, out, overwrite=True)
    else:
        leantune.export_to_lora(tmp, out, base_dir=tmp + ".base", overwrite=True)
'''


@pytest.mark.parametrize("job", ["save", "merge", "export"])
def test_process_killed_mid_write_leaves_the_previous_output(tmp_path, job):
    adapter = _saved_adapter(tmp_path, "lora_xs")
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    out = tmp_path / "out"
    if job == "save":
        leantune.save_adapter(PeftModel.from_pretrained(tiny_model("llama"), str(adapter)), out)
    elif job == "merge":
        leantune.merge_to_directory(base, adapter, out)
    else:
        leantune.export_to_lora(adapter, out, base_dir=base)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    marker = tmp_path / "writing"
    script = CHILD.format(root=str(ROOT), out=str(out), job=job, marker=str(marker))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the child never started writing"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output, byte for byte
