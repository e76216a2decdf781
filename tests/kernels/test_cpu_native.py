"""The C kernels of the CPU step-activation path (``leantune.kernels.cpu_native``) against the torch ops path.

Both paths must give the same bits: codes, packing (partial last byte included) and the backward's single
rounding, for every input dtype, at and next to the thresholds, for NaN/inf/±0, and when work is split between
threads. Also: the build cache, the off switch, and the fallback when no compiler works.
"""

import shutil
import warnings

import pytest
import torch

from leantune.kernels import activations as act
from leantune.kernels import cpu_native, norms

HAS_COMPILER = cpu_native._compiler() is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
KINDS = ["regelu2", "resilu2"]
SOURCE = cpu_native._CSRC / "step_activation.c"


def _inputs(n: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    _, thresholds = act._CONSTANTS[kind]
    c32 = torch.tensor(thresholds, dtype=torch.float32)
    special = torch.cat([c32, torch.nextafter(c32, c32 + 1), torch.nextafter(c32, c32 - 1),
                         torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])]).double()
    if dtype == torch.float64:
        c64 = torch.tensor(thresholds, dtype=torch.float64)
        special = torch.cat([special, c64, torch.nextafter(c64, c64 + 1), torch.nextafter(c64, c64 - 1)])
    x = torch.randn(n, dtype=torch.float64) * 4
    x[:min(n, special.numel())] = special[:n]
    return x.to(dtype)


@needs_compiler
def test_library_builds_where_a_compiler_exists():
    for name, functions in cpu_native._SIGNATURES.items():
        lib = cpu_native.library(name)
        assert lib is not None, f"a C compiler is on PATH, so {name}.c should build"
        assert all(hasattr(lib, function) for function in functions)


@needs_compiler
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 15, 16, 17, 33, 1000, 4099])
def test_flags_equal_the_torch_path(kind, dtype, n):
    _, thresholds = act._CONSTANTS[kind]
    x = _inputs(n, dtype, kind)
    native = act.packed_step_flags(x, thresholds)
    assert native.dtype == torch.uint8 and native.numel() == (n + 3) // 4
    assert torch.equal(native, act.packed_step_flags(x, thresholds, native=False))


@needs_compiler
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 16, 31, 1000, 4099])
def test_backward_equals_the_torch_path(kind, dtype, n):
    _, thresholds = act._CONSTANTS[kind]
    slopes = act.step_slopes(kind)
    packed = act.packed_step_flags(_inputs(n, torch.float32, kind), thresholds, native=False)
    grad = torch.randn(n, dtype=torch.float64).to(dtype)
    big = torch.finfo(dtype).max
    grad[:4] = torch.tensor([float("nan"), float("inf"), big, -big])[:n].to(dtype)  # overflow to ±inf on rounding
    assert cpu_native.step_backward(grad, packed, slopes) is not None
    torch.testing.assert_close(act.packed_step_backward(grad, packed, slopes),
                               act.packed_step_backward(grad, packed, slopes, native=False),
                               rtol=0, atol=0, equal_nan=True)


@needs_compiler
def test_unsupported_inputs_fall_back():
    slopes = act.step_slopes("regelu2")
    _, thresholds = act._CONSTANTS["regelu2"]
    packed = torch.zeros(3, dtype=torch.uint8)
    assert cpu_native.step_backward(torch.ones(10, dtype=torch.float16), packed, slopes) is None  # torch path
    assert cpu_native.step_flags(torch.ones(10, dtype=torch.float16), thresholds) is None  # needs its table
    assert cpu_native.step_flags(torch.ones(10, dtype=torch.float16), thresholds, torch.zeros(10)) is None
    assert cpu_native.step_flags(torch.ones(10, dtype=torch.int32), thresholds) is None
    grad = torch.randn(10, dtype=torch.float16)
    assert torch.equal(act.packed_step_backward(grad, packed, slopes),
                       act.packed_step_backward(grad, packed, slopes, native=False))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threaded_split_gives_the_same_bits(dtype, monkeypatch):
    monkeypatch.setattr(cpu_native, "_MIN_PER_THREAD", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _, thresholds = act._CONSTANTS["regelu2"]
        x = _inputs(1000 * 3 + 7, dtype, "regelu2")
        x2d = x[: 3000].view(100, 30).t()  # non-contiguous input: made contiguous first
        for inp in (x, x2d):
            packed = act.packed_step_flags(inp, thresholds)
            assert torch.equal(packed, act.packed_step_flags(inp, thresholds, native=False))
            grad = torch.randn(inp.shape).to(dtype)
            slopes = act.step_slopes("regelu2")
            assert torch.equal(act.packed_step_backward(grad, packed, slopes),
                               act.packed_step_backward(grad, packed, slopes, native=False))
    finally:
        torch.set_num_threads(threads)


def test_switch_off_uses_the_torch_path(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    assert cpu_native.library() is None
    _, thresholds = act._CONSTANTS["regelu2"]
    x = torch.randn(101)
    assert cpu_native.step_flags(x, thresholds) is None
    assert torch.equal(act.packed_step_flags(x, thresholds), act.packed_step_flags(x, thresholds, native=False))


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_native, "_loaded", {})
    monkeypatch.setenv("LEANTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="could not build the CPU kernels"):
        assert cpu_native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_native.library() is None  # remembered: no second attempt, no second warning
    _, thresholds = act._CONSTANTS["regelu2"]
    x = torch.randn(33)
    assert torch.equal(act.packed_step_flags(x, thresholds), act.packed_step_flags(x, thresholds, native=False))
    assert not list(tmp_path.rglob("*.tmp")), "a failed build must not leave partial files behind"


@needs_compiler
def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANTUNE_CACHE_DIR", str(tmp_path))
    compiler = cpu_native._compiler()
    path = cpu_native._build(SOURCE, compiler)
    assert path.parent == tmp_path / "cpu_kernels" and path.exists()
    calls = []
    monkeypatch.setattr(cpu_native.subprocess, "run", lambda *a, **k: calls.append(a))
    assert cpu_native._build(SOURCE, compiler) == path and not calls  # loaded, not rebuilt
    changed = tmp_path / "step_activation.c"
    changed.write_text(SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.undo()
    monkeypatch.setenv("LEANTUNE_CACHE_DIR", str(tmp_path))
    edited = cpu_native._build(changed, compiler)
    assert edited != path and edited.exists()  # another source, another library (headers still found)
    headers = tmp_path / "csrc"
    shutil.copytree(cpu_native._CSRC, headers)
    (headers / "bf16.h").write_text((headers / "bf16.h").read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu_native, "_CSRC", headers)
    assert cpu_native._build(headers / "step_activation.c", compiler) not in (path, edited)  # a header edit too


def _ms_norm_case(rows: int, width: int, dtype: torch.dtype, kind: str):
    x = torch.randn(rows, width, dtype=torch.float64)
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(rows, width).to(dtype), (x * rstd).to(dtype), rstd.to(stat), torch.randn(rows, width).to(dtype),
            torch.randn(width).to(dtype))


@needs_compiler
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 7, 16, 37, 4099])
@pytest.mark.parametrize("with_affine", [False, True])
def test_ms_norm_backward_matches_the_formula(kind, dtype, width, with_affine):
    """C pass vs the formula in fp64 on the same (rounded) inputs: only the final rounding and fp32 sums differ."""
    dy, y, rstd, dout, weight = _ms_norm_case(6, width, dtype, kind)
    extra = (dout, weight) if with_affine else ()
    dx = cpu_native.ms_norm_backward(dy, y, rstd, kind, *extra)
    assert dx is not None and dx.dtype == dtype and dx.shape == y.shape
    g = dy.double() + (dout.double() * weight.double() if with_affine else 0)
    yd = y.double()
    centred = g - g.mean(-1, keepdim=True) if kind == "layernorm" else g
    expected = rstd.double() * (centred - (g * yd).mean(-1, keepdim=True) * yd)
    # error relative to the size of the terms (width 1 or 2 cancels them almost exactly)
    scale = (rstd.double() * (g.abs() + g.abs().mean(-1, keepdim=True) + (g * yd).abs().mean(-1, keepdim=True)
                              * yd.abs())).max()
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 8e-3}[dtype]
    assert ((dx.double() - expected).abs().max() / scale).item() < tol
    # the public reference uses it, and its torch-ops path agrees (affine gradient included)
    affine = {"grad_out": dout, "weight": weight} if with_affine else {}
    torch.testing.assert_close(norms.reference_ms_norm_backward(dy, y, rstd, kind, **affine),
                               norms.reference_ms_norm_backward(dy, y, rstd, kind, native=False, **affine),
                               **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))


@needs_compiler
def test_ms_norm_backward_rows_split_between_threads(monkeypatch):
    monkeypatch.setattr(cpu_native, "_MIN_PER_THREAD", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        dy, y, rstd, dout, weight = _ms_norm_case(101, 48, torch.float32, "layernorm")
        split = cpu_native.ms_norm_backward(dy, y, rstd, "layernorm", dout, weight)
        monkeypatch.setattr(cpu_native, "_MIN_PER_THREAD", 1 << 30)
        assert torch.equal(split, cpu_native.ms_norm_backward(dy, y, rstd, "layernorm", dout, weight))
    finally:
        torch.set_num_threads(threads)


@needs_compiler
def test_ms_norm_backward_declines_what_it_does_not_handle():
    dy, y, rstd, dout, weight = _ms_norm_case(4, 8, torch.float32, "rmsnorm")
    assert cpu_native.ms_norm_backward(dy.half(), y.half(), rstd, "rmsnorm") is None  # fp16: torch path
    assert cpu_native.ms_norm_backward(dy, y, rstd.double(), "rmsnorm") is None  # rstd in the wrong precision
    assert cpu_native.ms_norm_backward(dy, y, rstd[:3], "rmsnorm") is None  # one rstd per row
    assert cpu_native.ms_norm_backward(dy, y, rstd, "rmsnorm", dout.double(), weight.double()) is None
    assert cpu_native.ms_norm_backward(dy, y, rstd, "rmsnorm", dout, weight[:5]) is None  # one weight per column
    with pytest.raises(ValueError, match="go together"):
        cpu_native.ms_norm_backward(dy, y, rstd, "rmsnorm", dout)
