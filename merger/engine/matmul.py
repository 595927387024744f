"""`linear`: the kernel calibrate.py measured fastest on this CPU for the dtype and the row count: the native
gemv (decode) or gemm (prefill), F.linear, or torch's float32 GEMM over upcast weight blocks (upcast.py).

Why the candidates (measured on a 2-core AVX2 EPYC, torch 2.13): without native bf16/fp16 GEMM, a 64-row bf16
matmul costs ~4x the float32 one, which the upcast blocks avoid without a float32 copy of the weight; the
native gemv reads weights at ~85% of the memory bandwidth (torch's GEMV: ~50-65%), and the native gemm
widens half weights while packing them. Which wins differs by CPU, so it is measured, not assumed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from merger.engine import calibrate, native, panels
from merger.engine.upcast import blocked

BLOCKED_MIN_ROWS = 8  # below this (decode) a matmul is memory-bound: a gemv


def slow_half(dtype: torch.dtype, device: torch.device) -> bool:
    """True for bf16/fp16 on a CPU where torch's own half-precision GEMM was measured slower than float32 over
    upcast blocks (calibrate.py): there, compute in float32."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and \
        bool(calibrate.choice(dtype, "slow_torch"))


def use_blocked(x: torch.Tensor) -> bool:
    """True when a matmul of `x` (rows = all leading dims) should take the blocked float32 path."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return x.numel() // max(x.shape[-1], 1) >= BLOCKED_MIN_ROWS and calibrate.choice(x.dtype, "prefill") == "blocked"


def _native_kernel(x: torch.Tensor, w: torch.Tensor, rows: int):
    """The native kernel for this call (gemv below BLOCKED_MIN_ROWS rows, else gemm), or None: CPU only, and
    only where calibrate.py measured it the fastest for this dtype and phase (weights in panels included)."""
    if x.dtype != w.dtype or w.dim() not in (2, 3) or w.stride(-1) != 1 or x.device.type != "cpu":
        return None
    k = w.shape[0] * w.shape[2] if w.dim() == 3 else w.shape[1]
    if x.shape[-1] != k or x.dtype not in native.TYPE_NAMES:
        return None  # F.linear raises torch's usual shape error
    decode = rows < BLOCKED_MIN_ROWS
    if calibrate.choice(x.dtype, "decode" if decode else "prefill") != "native":
        return None
    return native.gemv_kernel(x.dtype) if decode else native.gemm_kernel(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T (+ b): the result is in `out_dtype` (default x.dtype). w may be in panels
    ([K / P, N, P], panels.py): the native kernels read them as they are, torch's paths a plain copy."""
    out_dtype = out_dtype or x.dtype
    rows = math.prod(x.shape[:-1])
    kernel = _native_kernel(x, w, rows)
    if w.dim() == 3 and (kernel is None or out_dtype not in (torch.float32, x.dtype)):
        w = panels.plain(w)
        kernel = _native_kernel(x, w, rows)
    if kernel is not None and out_dtype in (torch.float32, x.dtype):
        x2 = x.reshape(rows, x.shape[-1])
        if rows < BLOCKED_MIN_ROWS:  # decode: x's conversion, bias and rounding happen inside the one call
            y = native.gemv(x2.contiguous(), w, kernel, b, out_dtype, int(calibrate.choice(w.dtype, "side_from")))
        else:
            y = native.gemm(x2.float().contiguous(), w, kernel, b, out_dtype)
        return y.view(*x.shape[:-1], w.shape[-2])
    if not use_blocked(x):
        y = F.linear(x, w, b)
        return y if y.dtype == out_dtype else y.to(out_dtype)
    return blocked(x, w, b, out_dtype)
