"""The engine's C++ CPU kernels: built once per machine with torch's extension tooling, cached.

The source is compiled for the CPU it runs on (-march=native), so the cache key covers the
source, torch, the compiler and the CPU's instruction-set flags; a cache directory shared by
different machines keeps one build per kind. A build takes about a minute on two cores and
happens on the first start only; later starts load the cached library in milliseconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "paged_attention.cpp", CSRC / "layer_ops.cpp", CSRC / "skinny_linear.cpp",
           CSRC / "panel_linear.cpp")
HEADERS = (CSRC / "cpu_math.h",)
OPS = ("paged_decode", "rms_norm", "add_rms_norm", "rope_and_cache", "silu_and_mul",
       "skinny_linear", "pack_panels", "panel_linear", "argmax_rows")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
          "-std=c++17"]
_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None


def cache_root() -> Path:
    env = os.environ.get("MMSERVE_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "mmserve") / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def has_fma_vectors() -> bool:
    """x86 with AVX2 and FMA (AVX-512 or not): where mmserve::panel_linear has its register
    blocks (elsewhere its portable loop is slower than oneDNN)."""
    return {"avx2", "fma"} <= set(_cpu_flags().split())


def has_bf16_dot() -> bool:
    """AVX-512 BF16 (vdpbf16ps): where mmserve::panel_linear takes bf16 weights."""
    return "avx512_bf16" in _cpu_flags().split()


def _compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "no compiler"


def build_key() -> str:
    h = hashlib.sha256()
    files = [path.read_bytes() for path in (*SOURCES, *HEADERS)]
    for part in (*files, torch.__version__.encode(), platform.machine().encode(),
                 _cpu_flags().encode(), _compiler_version().encode(), " ".join(_FLAGS).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def load() -> bool:
    """Builds (first time) and loads the kernels; False, with the reason in `error()`, when
    they cannot be built here (no compiler, no ninja)."""
    global _loaded, _error
    with _lock:
        if _loaded is None:
            try:
                _build_and_load()
                _loaded = True
            except Exception as exc:  # a missing toolchain must not stop the engine
                _loaded, _error = False, f"{type(exc).__name__}: {exc}"
                log.warning("CPU kernels unavailable, the engine runs plain torch ops: %s",
                            _error)
        return _loaded


def error() -> str | None:
    return _error


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler on PATH")
    key = build_key()
    name = f"mmserve_kernels_{key}"
    directory = cache_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    built = (directory / f"{name}.so").is_file()
    if not built:
        log.info("building the CPU kernels once (cached in %s)", directory)
    started = time.monotonic()
    cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(directory),
                       extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)
    if not built:
        log.info("CPU kernels built in %.0f s", time.monotonic() - started)
    missing = [op for op in OPS if not hasattr(torch.ops.mmserve, op)]
    if missing:
        raise RuntimeError(f"{name}.so loaded but lacks the ops {missing}")
