"""The engine's native CPU kernels (cpu_matmul.c: gemv for decode, gemm for prefill, bf16/fp16/fp32 weights;
cpu_ops.c: RMSNorm, one-query attention over a cache of any of those types; cpu_step.c: the whole batch-1 decode
step; the headers they share, cpu_*.h; AVX2), built into one library on first use with the system C compiler
into the merger cache, called via ctypes.

Optional by design: with no compiler, another CPU, or MERGER_NATIVE=0, the `*_kernel` lookups return None
and the engine stays on torch's own ops. Which of them runs where is measured once per machine
(calibrate.py). Why they exist: decode is nothing but GEMVs, torch's reach about half the memory bandwidth on
CPUs without native bf16 math (its bf16 one is compute-bound there) and ~65% in float32, and at decode sizes
torch's per-op cost outweighs the math (the step kernel runs a token in one call); prefill in bf16 otherwise
upcasts weight blocks for MKL, which gemm does inside its packing.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from pathlib import Path

import torch

from merger import native_build

_HERE = Path(__file__).parent
SOURCES = [_HERE / f"cpu_{part}.c" for part in ("matmul", "ops", "step")]
HEADERS = [_HERE / f"cpu_{part}.h" for part in ("simd", "dots", "attend")]
# -ffp-contract=off: scalar math stays the separate multiplies and adds torch does (the kernels' FMAs are explicit)
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
LIBS = ["-lm"]
TYPE_NAMES = native_build.TYPE_NAMES
SIDE_FROM = 4096  # gemv: from this K on, weight rows are read side by side unless calibration chose otherwise
_OUT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # the C enum { BF16, FP16, FP32 }
# W, N, K, ldw, X, M, ldx, Y, ldy (gemv and gemm: the panel width P after ldw), then bias, (gemv: X type,)
# Y type, (gemv: side_from,) threads
_ARGS = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
         ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
# op -> (argument types, result type, weight types it exists for)
_SIGNATURES = {
    "gemv": (_ARGS[:4] + [_L] + _ARGS[4:] + [_P, _I, _I, _L, _I], _I, tuple(TYPE_NAMES)),
    "gemm": (_ARGS[:4] + [_L] + _ARGS[4:] + [_P, _I, _I], _I, tuple(TYPE_NAMES)),
    # X, rows, dim, ldx, w, eps, Y, ldy, threads
    "rmsnorm": ([_P, _L, _L, _L, _P, _F, _P, _L, _I], None, tuple(TYPE_NAMES)),
    # Q, B, H, D, K, V, KV, S, batch / head / position strides of K and V, scale, O, threads
    "attend": ([_P, _L, _L, _L, _P, _P, _L, _L, _L, _L, _L, _F, _P, _I], _I, tuple(TYPE_NAMES)),
    # step_model, token, pos, cos row, sin row, logits, threads (step.py builds the tables)
    "step": ([_P, _L, _L, _P, _P, _P, _I], _I, tuple(TYPE_NAMES)),
}


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library or None, why): built at most once per process, reused across processes."""
    if os.environ.get("MERGER_NATIVE", "1") == "0":
        return None, "disabled by MERGER_NATIVE=0"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None, f"no kernel for {sys.platform}/{platform.machine()}"
    missing = native_build.avx2_missing()
    if missing:
        return None, missing
    lib, why = native_build.load("cpu_kernels", SOURCES, HEADERS, FLAGS, LIBS)
    if lib is None:
        return None, why
    for op, (argtypes, restype, dtypes) in _SIGNATURES.items():
        for dtype in dtypes:
            fn = getattr(lib, f"merger_{op}_{TYPE_NAMES[dtype]}")
            fn.argtypes, fn.restype = argtypes, restype
    return lib, why


def source_key(cc: str | None = None) -> str:
    """Hash of the kernel sources and headers, the compiler and its flags: the compiled library's (and
    calibration's) key."""
    return native_build.source_key([*SOURCES, *HEADERS], FLAGS, LIBS, cc)


def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library or None, why): see _library."""
    return _library()


def status() -> str:
    """One line for benchmarks and debugging: whether the native kernel is in use, and why (not)."""
    lib, why = _library()
    return f"native CPU kernels: {'on' if lib is not None else 'off'} ({why})"


def gemv_kernel(dtype: torch.dtype):
    """The few-row kernel for weights of `dtype`, or None when the native kernels are unavailable."""
    return _kernel("gemv", dtype)


def gemm_kernel(dtype: torch.dtype):
    """The many-row kernel for weights of `dtype`, or None when the native kernels are unavailable."""
    return _kernel("gemm", dtype)


def rmsnorm_kernel(dtype: torch.dtype):
    """RMSNorm of rows in `dtype`, or None when the native kernels are unavailable."""
    return _kernel("rmsnorm", dtype)


def attend_kernel(dtype: torch.dtype):
    """One-query attention over a KV cache in `dtype` (read as stored: bf16, fp16 or float32), or None."""
    return _kernel("attend", dtype)


def step_kernel(dtype: torch.dtype):
    """The whole batch-1 decode step of a model in `dtype` (step.py), or None."""
    return _kernel("step", dtype)


def _kernel(op: str, dtype: torch.dtype):
    if dtype not in _SIGNATURES[op][2]:
        return None
    lib, _ = _library()
    return None if lib is None else getattr(lib, f"merger_{op}_{TYPE_NAMES[dtype]}")


def _check(op: str, kernel, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
           x_dtypes: tuple[torch.dtype, ...]) -> torch.Tensor | None:
    """No pointer reaches C unless every read it implies stays inside x, w and bias, and the kernel is the
    one for w's dtype; returns the bias as float32."""
    if (x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1] or x.stride(1) != 1 or w.stride(1) != 1
            or x.dtype not in x_dtypes or out_dtype not in _OUT or not x.is_cpu or not w.is_cpu
            or kernel is not _kernel(op, w.dtype)):
        raise ValueError(f"native kernel: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype} "
                         f"(to {out_dtype}) do not fit")
    if bias is None:
        return None
    if bias.shape != (w.shape[0],) or not bias.is_cpu:
        raise ValueError(f"native kernel: bias {tuple(bias.shape)} does not fit {w.shape[0]} outputs")
    return bias.float().contiguous()


def _matmul_args(op: str, kernel, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, x_dtypes: tuple[torch.dtype, ...]) -> tuple[torch.Tensor | None, int, int, int]:
    """_check for a gemv or gemm, w [N, K] or in panels [K / P, N, P] contiguous (merger.engine.panels), which
    the kernels read as they are: (the float32 bias, N, w's row stride, P; P = K for rows)."""
    if w.dim() == 3:
        if not (w.is_contiguous() and x.dim() == 2 and w.shape[0] * w.shape[2] == x.shape[1]
                and w.shape[2] % 8 == 0):
            raise ValueError(f"native kernel: x {tuple(x.shape)} does not fit panels {tuple(w.shape)}")
        return _check(op, kernel, x[:, :w.shape[2]], w[0], bias, out_dtype, x_dtypes), w.shape[1], x.shape[1], \
            w.shape[2]
    bias = _check(op, kernel, x, w, bias, out_dtype, x_dtypes)
    return bias, w.shape[0], w.stride(0), w.shape[1]


def gemv(x: torch.Tensor, w: torch.Tensor, kernel, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float32, side_from: int = SIDE_FROM) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or float32) @ w[N, K].T (+ bias) -> [M, N] in out_dtype (float32, bf16 or fp16),
    summed in float32 and rounded once: the decode path, conversions included, in one call. Weight rows are
    read one after another below K = side_from, side by side from there (calibrate.py measures where that pays).
    w may be in panels (_matmul_args): the panels' sums are added in order."""
    bias, n, ldw, p = _matmul_args("gemv", kernel, x, w, bias, out_dtype, tuple(_OUT))
    m, k = x.shape
    y = torch.empty(m, n, dtype=out_dtype)
    if kernel(w.data_ptr(), n, k, ldw, p, x.data_ptr(), m, x.stride(0), y.data_ptr(), n,
              None if bias is None else bias.data_ptr(), _OUT[x.dtype], _OUT[out_dtype], side_from,
              torch.get_num_threads()):
        raise MemoryError(f"native gemv: no memory for {m} x {k} inputs")
    return y


def gemm(x: torch.Tensor, w: torch.Tensor, kernel, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [M, K] float32 @ w[N, K].T (+ bias) for many rows: [M, N] in out_dtype (float32, bf16 or fp16),
    summed in float32 and rounded once, as torch rounds. w may be in panels (_matmul_args): the same sums."""
    bias, n, ldw, p = _matmul_args("gemm", kernel, x, w, bias, out_dtype, (torch.float32,))
    m, k = x.shape
    y = torch.empty(m, n, dtype=out_dtype)
    if kernel(w.data_ptr(), n, k, ldw, p, x.data_ptr(), m, x.stride(0), y.data_ptr(), n,
              None if bias is None else bias.data_ptr(), _OUT[out_dtype], torch.get_num_threads()):
        raise MemoryError(f"native gemm: no memory for a {m}-token packing buffer")
    return y


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, kernel) -> torch.Tensor:
    """RMSNorm over the last dim of x, scaled by w (same dtype): a new tensor shaped like x."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    if (w.shape != (dim,) or w.dtype != x.dtype or not w.is_contiguous() or x2.stride(-1) != 1
            or not x.is_cpu or not w.is_cpu or kernel is not _kernel("rmsnorm", x.dtype)):
        raise ValueError(f"native rmsnorm: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype} do not fit")
    y = torch.empty(x2.shape, dtype=x.dtype)
    kernel(x2.data_ptr(), x2.shape[0], dim, x2.stride(0), w.data_ptr(), eps, y.data_ptr(), dim,
           torch.get_num_threads())
    return y.view(x.shape)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernel) -> torch.Tensor:
    """One query per head: q [B, H, D] (any float dtype, taken as float32), k and v [B, KV, S, D] views of one
    shape, dtype and strides (unit last stride), H a multiple of KV -> softmax(scale q k^T) v as float32
    [B, H, D], the keys and values read in their own dtype."""
    bsz, heads, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    if (k.shape != v.shape or k.stride() != v.stride() or k.dim() != 4 or k.shape[0] != bsz or k.shape[3] != dim
            or heads % kv_heads or k.stride(3) != 1 or k.dtype != v.dtype or not q.is_floating_point()
            or not (q.is_cpu and k.is_cpu and v.is_cpu) or kernel is not _kernel("attend", k.dtype)):
        raise ValueError(f"native attend: q {tuple(q.shape)}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} "
                         f"{v.dtype} do not fit")
    q = q.float().contiguous()
    out = torch.empty(bsz, heads, dim, dtype=torch.float32)
    if kernel(q.data_ptr(), bsz, heads, dim, k.data_ptr(), v.data_ptr(), kv_heads, keys, k.stride(0),
              k.stride(1), k.stride(2), scale, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"native attend: no memory for {keys} scores")
    return out
