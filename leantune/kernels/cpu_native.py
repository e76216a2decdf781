"""C kernels for two CPU reference paths of ``leantune.memory``, compiled on first use and called through ctypes.

On CPU, the torch reference of ReGELU2/ReSiLU2 is a chain of ops (three comparisons, a sum, a narrowing copy and a
pack forward; a gather and a multiply backward), each a full pass over the activation: 3-4x the time of the eager
GELU it replaces, several percent of a training step. The MS-norm backward likewise takes four passes (more in
bf16, through fp32 copies). ``csrc/step_activation.c`` does each activation direction in one pass and
``csrc/ms_norm.c`` the norm backward in one pass per row (same contracts as the torch references in
``activations.py`` / ``norms.py``).

A source is compiled the first time it is needed with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``) into a per-user cache (``$LEANTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/leantune`` or
``~/.cache/leantune``), keyed by a hash of the source, compiler and flags; later processes load the cached
library. This is the CPU counterpart of Triton's just-in-time compilation on GPU. With no compiler, a failed build
(warned once), or ``LEANTUNE_CPU_KERNELS=0``, :func:`library` returns ``None`` and callers use their torch ops,
which give the same bits for the activation and agree to rounding for the norm (tested).

Tensors of more than ``_MIN_PER_THREAD`` elements per thread are split between ``torch.get_num_threads()``
threads (ctypes releases the GIL during the call) on multiples of 16 elements or on whole rows, so no two pieces
write the same byte.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

__all__ = ["library", "step_flags", "step_backward", "ms_norm_backward", "int8_dequant", "cache_dir", "ENV_SWITCH"]

ENV_SWITCH = "LEANTUNE_CPU_KERNELS"  # "0" turns the C kernels off (torch reference everywhere)
_CSRC = Path(__file__).with_name("csrc")
_MIN_PER_THREAD = 1 << 20  # elements per thread; below this a hand-off costs about what it saves
_P, _N, _F, _D, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int
_SIGNATURES = {  # per C source in csrc/: its functions and their argument types
    "step_activation": {
        "step_flags_f32": [_P, _P, _N, _F, _F, _F],
        "step_flags_f64": [_P, _P, _N, _D, _D, _D],
        "step_flags_bf16": [_P, _P, _N, _F, _F, _F],
        "step_flags_table16": [_P, _P, _P, _N],
        "step_backward_f32": [_P, _P, _P, _N, _F, _F, _F],
        "step_backward_f64": [_P, _P, _P, _N, _D, _D, _D],
        "step_backward_bf16": [_P, _P, _P, _N, _F, _F, _F],
    },
    "ms_norm": {f"ms_norm_backward_{t}": [_P, _P, _P, _P, _P, _P, _N, _N, _I] for t in ("f32", "f64", "bf16")},
    "int8_dequant": {f"int8_dequant_{t}": [_P, _P, _P, _N, _N, _N] for t in ("f32", "bf16")},
}
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # a forked child inherits the pool object but not its threads: it makes its own


def cache_dir() -> Path:
    """Where compiled kernels are kept (created on demand)."""
    root = os.environ.get("LEANTUNE_CACHE_DIR")
    if root:
        return Path(root) / "cpu_kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "leantune" / "cpu_kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _isa_flags() -> list[str]:
    """Vector ISA flags from what this CPU supports (not -march=native: a shared cache may serve other CPUs, and
    the flags are part of the cache key)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()  # what ATen itself dispatches to on this CPU
    avx2 = ["-mavx2", "-mfma"]
    if capability == "AVX512":  # ATen's AVX512 level implies F, BW, VL and DQ
        return [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return avx2 if capability == "AVX2" else []


def _writable_dir() -> Path:
    """The cache directory, or a per-user temporary one when the cache cannot be written."""
    user = getattr(os, "getuid", int)()
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"leantune-cpu-kernels-{user}"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise RuntimeError(f"no writable directory for compiled kernels (tried {cache_dir()} and the temp dir)")


def _build(source: Path, compiler: str) -> Path:
    """Compile ``source`` into the cache (atomic rename, so concurrent processes never load a half-written file)."""
    # the key covers the shared headers too: a changed header must not load a stale library
    code = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))
    directory, errors = _writable_dir(), []
    for flags in (["-O3", "-shared", "-fPIC", *_isa_flags()], ["-O2", "-shared", "-fPIC"]):
        key = hashlib.sha256(code + "\0".join([compiler, *flags, platform.machine()]).encode()).hexdigest()[:16]
        path = directory / f"{source.stem}-{key}.so"
        if path.exists():
            return path
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            result = subprocess.run([compiler, *flags, "-I", str(_CSRC), "-o", str(tmp), str(source)],
                                    capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as error:
            raise RuntimeError(f"{compiler}: {error}") from error
        if result.returncode == 0:
            os.replace(tmp, path)
            return path
        tmp.unlink(missing_ok=True)
        errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-400:]}")
    raise RuntimeError("; ".join(errors))


def library(name: str = "step_activation") -> ctypes.CDLL | None:
    """The loaded kernel library ``csrc/<name>.c``, built on first call; ``None`` when switched off or
    unavailable (a failed build is warned about once and not retried in this process)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            _loaded[name] = _load(name)
    return _loaded[name]


def _load(name: str) -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        return None  # no toolchain: the torch reference is the CPU path (documented, nothing to warn about)
    try:
        lib = ctypes.CDLL(str(_build(_CSRC / f"{name}.c", compiler)))
        for function, argtypes in _SIGNATURES[name].items():
            fn = getattr(lib, function)
            fn.argtypes, fn.restype = argtypes, None
    except (OSError, RuntimeError, AttributeError) as error:
        warnings.warn(f"leantune: could not build the CPU kernels {name}.c ({error}); using the torch reference path "
                      f"(same results, slower). Set {ENV_SWITCH}=0 to skip the attempt.", RuntimeWarning,
                      stacklevel=3)
        return None
    return lib


def _parallel(fn: Callable, n: int, args: Callable[[int, int], tuple], align: int = 16, item_size: int = 1) -> None:
    """Run ``fn(*args(start, stop))`` over ``[0, n)`` in pieces of a multiple of ``align`` items (of
    ``item_size`` elements each, e.g. rows)."""
    global _pool, _pool_size, _pool_pid
    threads = min(torch.get_num_threads(), n * item_size // _MIN_PER_THREAD)
    if threads <= 1:
        fn(*args(0, n))
        return
    with _lock:
        if _pool_pid != os.getpid():
            _pool, _pool_size, _pool_pid = None, 0, os.getpid()
        if _pool_size < threads - 1:  # the calling thread runs one piece itself
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads - 1, thread_name_prefix="leantune-cpu"), threads - 1
        pool = _pool
    step = align * math.ceil(n / threads / align)
    pieces = [(start, min(n, start + step)) for start in range(0, n, step)]
    futures = [pool.submit(fn, *args(start, stop)) for start, stop in pieces[1:]]
    fn(*args(*pieces[0]))
    for future in futures:
        future.result()


def step_flags(x: torch.Tensor, thresholds: tuple[float, float, float],
               table16: torch.Tensor | None = None) -> torch.Tensor | None:
    """Packed 2-bit codes of CPU ``x`` (fp32, fp64, bf16; fp16 with its uint8 code ``table16`` of all 65,536 bit
    patterns); ``None`` if the C kernels are unavailable or the input is not supported."""
    names = {torch.float32: "step_flags_f32", torch.float64: "step_flags_f64", torch.bfloat16: "step_flags_bf16",
             torch.float16: "step_flags_table16"}
    if x.device.type != "cpu" or x.dtype not in names:
        return None
    if x.dtype == torch.float16 and (table16 is None or table16.numel() != 1 << 16):  # C indexes it by the bits
        return None
    lib = library()
    if lib is None:
        return None
    x = x.contiguous()
    n = x.numel()
    out = torch.empty(math.ceil(n / 4), dtype=torch.uint8)
    if n == 0:
        return out
    src, dst, size = x.data_ptr(), out.data_ptr(), x.element_size()
    if x.dtype == torch.float16:
        table = table16.to(torch.uint8).contiguous()
        args = lambda a, b: (src + a * size, table.data_ptr(), dst + a // 4, b - a)  # noqa: E731
    else:
        args = lambda a, b: (src + a * size, dst + a // 4, b - a, *thresholds)  # noqa: E731
    _parallel(getattr(lib, names[x.dtype]), n, args)
    return out


def step_backward(grad: torch.Tensor, packed: torch.Tensor, slopes: tuple[float, float, float]) -> torch.Tensor | None:
    """``grad · s[code]`` with ``s = (0, *slopes)`` (rounded to fp32 except for fp64 gradients) from the packed
    codes; ``None`` if unavailable or unsupported (fp16 gradients use the torch path)."""
    names = {torch.float32: "step_backward_f32", torch.float64: "step_backward_f64",
             torch.bfloat16: "step_backward_bf16"}
    if grad.device.type != "cpu" or grad.dtype not in names or packed.device.type != "cpu":
        return None
    lib = library()
    if lib is None:
        return None
    grad, packed = grad.contiguous(), packed.contiguous()
    n = grad.numel()
    out = torch.empty_like(grad)
    if n:
        src, codes, dst, size = grad.data_ptr(), packed.data_ptr(), out.data_ptr(), grad.element_size()
        _parallel(getattr(lib, names[grad.dtype]), n,
                  lambda a, b: (src + a * size, codes + a // 4, dst + a * size, b - a, *slopes))
    return out


def ms_norm_backward(grad_y: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, kind: str,
                     grad_out: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """MS-norm ``dx`` from the saved output ``y`` and per-row ``rstd`` (formulas in ``csrc/ms_norm.c``);
    ``grad_out``/``weight`` add the gradient of ``weight ⊙ y + β`` (post-norm residual). CPU fp32/bf16/fp64 with
    fp32 ``rstd`` (fp64 for fp64); ``None`` if unavailable or unsupported."""
    names = {torch.float32: "ms_norm_backward_f32", torch.float64: "ms_norm_backward_f64",
             torch.bfloat16: "ms_norm_backward_bf16"}
    if (grad_out is None) != (weight is None):
        raise ValueError("ms_norm_backward: grad_out and weight go together (the gradient of weight ⊙ y + β)")
    tensors = [grad_y, y] + ([grad_out, weight] if grad_out is not None else [])
    if (y.dtype not in names or any(t.device.type != "cpu" or t.dtype != y.dtype for t in tensors)
            or rstd.dtype != (torch.float64 if y.dtype == torch.float64 else torch.float32)
            or grad_y.shape != y.shape or y.dim() == 0 or (grad_out is not None and grad_out.shape != y.shape)):
        return None
    lib = library("ms_norm")
    if lib is None:
        return None
    h = y.shape[-1]
    rows = y.numel() // h if h else 0
    if rstd.numel() != rows or (weight is not None and weight.numel() != h):  # the C loops index both blindly
        return None
    grad_y, y, rstd = grad_y.contiguous(), y.contiguous(), rstd.contiguous()
    out = torch.empty_like(y)
    if rows and h:
        size = y.element_size()
        if grad_out is not None:
            grad_out, weight = grad_out.contiguous(), weight.contiguous()
        dout = grad_out.data_ptr() if grad_out is not None else None
        w = weight.data_ptr() if grad_out is not None else None
        layernorm = int(kind == "layernorm")
        ptrs = (grad_y.data_ptr(), y.data_ptr(), rstd.data_ptr(), out.data_ptr())

        def args(a: int, b: int) -> tuple:
            off = a * h * size
            return (ptrs[0] + off, dout + off if dout else None, w, ptrs[1] + off, ptrs[2] + a * rstd.element_size(),
                    ptrs[3] + off, b - a, h, layernorm)

        _parallel(getattr(lib, names[y.dtype]), rows, args, align=1, item_size=h)
    return out


def int8_dequant(weight: torch.Tensor, scales: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor | None:
    """deq(W) of a CPU INT8 (m, n) weight with (m · ⌈n / block⌉,) fp32 scales in fp32 or bf16, one pass
    (``csrc/int8_dequant.c``; the torch reference's bits); ``None`` if unavailable or unsupported."""
    names = {torch.float32: "int8_dequant_f32", torch.bfloat16: "int8_dequant_bf16"}
    if (weight.device.type != "cpu" or weight.dtype != torch.int8 or weight.dim() != 2 or dtype not in names
            or scales.dtype != torch.float32):
        return None
    lib = library("int8_dequant")
    if lib is None:
        return None
    weight, scales = weight.contiguous(), scales.contiguous()
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=dtype)
    if weight.numel():
        per_row, size = math.ceil(cols / block), out.element_size()
        q, s, o = weight.data_ptr(), scales.data_ptr(), out.data_ptr()
        _parallel(getattr(lib, names[dtype]), rows,
                  lambda a, b: (q + a * cols, s + a * per_row * 4, o + a * cols * size, b - a, cols, block),
                  align=1, item_size=cols)
    return out
