"""Native code from csrc/: where it is built and cached, and the CPU kernels' builder.

The CPU kernels (`csrc/*_cpu.cpp`: the torch sampling path's Philox/Gumbel-max, the torch attention backend's
decode step) are plain C++ without torch headers, so a build takes well under a second with the system compiler;
they are loaded with ctypes. The CUDA extension (`kernels.cfg_sampling`) is built by torch's extension loader.
Both cache under `$GOTR1_CACHE` (default ~/.cache/gotr1).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# ctypes argument types of the CPU kernels' entry points: pointers (`tensor.data_ptr()`), int64, float.
P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def cache_dir(kind: str) -> Path:
    """`$GOTR1_CACHE/kind` (default ~/.cache/gotr1/kind)."""
    return Path(os.environ.get("GOTR1_CACHE", Path.home() / ".cache" / "gotr1")) / kind




def _cpu_identity() -> str:
    """What -march=native compiles for: a library built on one CPU model must not be loaded on another that shares
    the cache directory."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def cpu_library(name: str, source: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`source` (C++, `extern "C"` entry points, no torch headers) built for this CPU with the system compiler
    (`$CXX`, else `c++`; extra `flags`), once per source version and CPU model, cached in `cache_dir("cpu_kernels")`;
    None, with the reason logged, when it cannot be had (callers keep their torch path)."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        logger.warning("cpu kernel %s: no C++ compiler found ($CXX or c++); using the torch path", name)
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-Wno-psabi", *flags]
    key = hashlib.sha256("\0".join([source, *flags, _cpu_identity()]).encode()).hexdigest()[:16]
    cache = cache_dir("cpu_kernels")
    path = cache / f"{name}-{key}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: builds may race
                src = Path(tmp) / f"{name}.cpp"
                src.write_text(source)
                subprocess.run([cxx, *flags, str(src), "-o", str(src.with_suffix(".so"))], check=True,
                               capture_output=True, text=True)
                os.replace(src.with_suffix(".so"), path)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("cpu kernel %s: build or load failed (%s); using the torch path", name, detail)
        return None


@functools.cache
def csrc_library(filename: str, functions: tuple[tuple[str, type | None, tuple[type, ...]], ...],
                 flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`csrc/filename` through `cpu_library`, each `(name, restype, argtypes)` of `functions` declared on it (ctypes
    would otherwise pass every int as a C int); None where it cannot be built."""
    lib = cpu_library(Path(filename).stem, (CSRC / filename).read_text(), flags)
    if lib is not None:
        for name, restype, argtypes in functions:
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, list(argtypes)
    return lib
