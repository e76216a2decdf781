"""C kernels for the CPU path of the 2-bit step activations, compiled on first use and called through ctypes.

On CPU the torch reference of ReGELU2/ReSiLU2 needs a chain of ops (three comparisons, a sum, a narrowing copy,
a pack; a gather and a multiply in backward), each a full pass over the activation: about 5x the time of the eager
GELU it replaces, which is several percent of a training step. One C loop does each direction in a single pass.

The source (``csrc/step_activation.c``, same contract as the torch reference) is compiled the first time it is
needed with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a per-user cache
(``$LEANTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/leantune`` or ``~/.cache/leantune``), keyed by a hash of the
source, compiler and flags; later processes load the cached library. This is the CPU counterpart of Triton's
just-in-time compilation on GPU. With no compiler, a failed build (warned once), or ``LEANTUNE_CPU_KERNELS=0``,
:func:`library` returns ``None`` and callers use their torch reference, which gives the same bits (tested).

Large tensors are split between ``torch.get_num_threads()`` threads on multiples of 4 elements (ctypes releases
the GIL during the call, and no two pieces share an output byte).
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

__all__ = ["library", "step_flags", "step_backward", "cache_dir", "ENV_SWITCH"]

ENV_SWITCH = "LEANTUNE_CPU_KERNELS"  # "0" turns the C kernels off (torch reference everywhere)
_SOURCE = Path(__file__).with_name("csrc") / "step_activation.c"
_MIN_PER_THREAD = 1 << 20  # elements per thread; below this a hand-off costs about what it saves
_P, _N, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
_SIGNATURES = {
    "step_flags_f32": [_P, _P, _N, _F, _F, _F],
    "step_flags_f64": [_P, _P, _N, _D, _D, _D],
    "step_flags_bf16": [_P, _P, _N, _F, _F, _F],
    "step_flags_table16": [_P, _P, _P, _N],
    "step_backward_f32": [_P, _P, _P, _N, _F, _F, _F],
    "step_backward_f64": [_P, _P, _P, _N, _D, _D, _D],
    "step_backward_bf16": [_P, _P, _P, _N, _F, _F, _F],
}
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


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
    code, directory, errors = source.read_bytes(), _writable_dir(), []
    for flags in (["-O3", "-shared", "-fPIC", *_isa_flags()], ["-O2", "-shared", "-fPIC"]):
        key = hashlib.sha256(code + "\0".join([compiler, *flags, platform.machine()]).encode()).hexdigest()[:16]
        path = directory / f"{source.stem}-{key}.so"
        if path.exists():
            return path
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            result = subprocess.run([compiler, *flags, "-o", str(tmp), str(source)], capture_output=True, text=True,
                                    timeout=120)
        except (OSError, subprocess.SubprocessError) as error:
            raise RuntimeError(f"{compiler}: {error}") from error
        if result.returncode == 0:
            os.replace(tmp, path)
            return path
        tmp.unlink(missing_ok=True)
        errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-400:]}")
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; ``None`` when switched off or unavailable."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if "lib" in _loaded:
        return _loaded["lib"]
    with _lock:
        if "lib" not in _loaded:
            _loaded["lib"] = _load()
    return _loaded["lib"]


def _load() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        return None  # no toolchain: the torch reference is the CPU path (documented, nothing to warn about)
    try:
        lib = ctypes.CDLL(str(_build(_SOURCE, compiler)))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
    except (OSError, RuntimeError, AttributeError) as error:
        warnings.warn(f"leantune: could not build the CPU kernels ({error}); using the torch reference path "
                      f"(same results, slower). Set {ENV_SWITCH}=0 to skip the attempt.", RuntimeWarning,
                      stacklevel=3)
        return None
    return lib


def _parallel(fn: Callable, n: int, args: Callable[[int, int], tuple]) -> None:
    """Run ``fn(*args(start, stop))`` over ``[0, n)`` in pieces of a multiple of 16 elements."""
    global _pool, _pool_size
    threads = min(torch.get_num_threads(), n // _MIN_PER_THREAD)
    if threads <= 1:
        fn(*args(0, n))
        return
    with _lock:
        if _pool_size < threads - 1:  # the calling thread runs one piece itself
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads - 1, thread_name_prefix="leantune-cpu"), threads - 1
        pool = _pool
    step = 16 * math.ceil(n / threads / 16)
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
    if x.device.type != "cpu" or x.dtype not in names or (x.dtype == torch.float16 and table16 is None):
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
