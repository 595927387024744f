"""The one native kernel: gemv.c (few-row matmul, bf16/fp16/fp32 weights, AVX2 CPUs), compiled on first
use with the system C compiler into the merger cache and called through ctypes.

Optional by design: with no compiler, another CPU, or MERGER_NATIVE=0, `gemv_kernel` returns None and the
engine stays on torch's own matmul. Why it exists: decode is nothing but such GEMVs, and torch's reach
about half the memory bandwidth on CPUs without native bf16 math (its bf16 one is compute-bound there)
and ~65% in float32 (measured on a 2-core EPYC: 15-16 GB/s against 21-25 GB/s for this kernel).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from merger.cache import cache_dir

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]
_SYMBOLS = {torch.bfloat16: "merger_gemv_bf16", torch.float16: "merger_gemv_fp16",
            torch.float32: "merger_gemv_fp32"}


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library or None, why): built at most once per process, reused across processes."""
    if os.environ.get("MERGER_NATIVE", "1") == "0":
        return None, "disabled by MERGER_NATIVE=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"no kernel for {sys.platform}/{platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler found (set CC)"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    lib_path = cache_dir("kernels") / f"gemv-{key}.so"
    if not lib_path.exists():
        try:
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                out = Path(tmp) / lib_path.name
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, lib_path)  # atomic: a concurrent build just replaces it with the same file
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            first = detail.decode(errors="replace").strip().splitlines()[:1]
            return None, f"compiling {SOURCE.name} failed: {first[0] if first else e}"
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        return None, f"loading {lib_path} failed: {e}"
    for sym in _SYMBOLS.values():
        fn = getattr(lib, sym)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                       ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        fn.restype = None
    return lib, f"{lib_path}"


def status() -> str:
    """One line for benchmarks and debugging: whether the native kernel is in use, and why (not)."""
    lib, why = _library()
    return f"native gemv kernel: {'on' if lib is not None else 'off'} ({why})"


def gemv_kernel(dtype: torch.dtype):
    """The ctypes function for weights of `dtype`, or None when the native kernel is unavailable."""
    if dtype not in _SYMBOLS:
        return None
    lib, _ = _library()
    return None if lib is None else getattr(lib, _SYMBOLS[dtype])


def gemv(x: torch.Tensor, w: torch.Tensor, kernel) -> torch.Tensor:
    """x [M, K] float32 @ w[N, K].T (bf16/fp16/fp32) -> float32 [M, N]; both with unit column stride."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1 or x.dtype != torch.float32:
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} do not fit")  # no stray reads
    y = torch.empty(m, n, dtype=torch.float32)
    kernel(w.data_ptr(), n, k, w.stride(0), x.data_ptr(), m, x.stride(0), y.data_ptr(), n,
           torch.get_num_threads())
    return y
