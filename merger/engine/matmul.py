"""`linear`: F.linear, except that many-row matmuls on CPU run as out.T = W_block @ x.T over row blocks
of the weight, in float32.

Why (measured on a 2-core AVX2 EPYC, torch 2.13): without native bf16/fp16 GEMM, a 64-row bf16 matmul
costs ~4x the float32 one, and even in float32 the blocked form runs 1.1-2.5x faster than F.linear for
8-512 rows (each 4 MiB block stays in cache). Half-precision blocks are upcast one at a time, so no
float32 copy of a whole weight ever exists. Where the native kernels (native.py) could be built, few-row
calls (decode) take their gemv, which reads weights at ~85% of the memory bandwidth (torch's GEMV: ~50-65%),
and many-row calls their gemm (105-170 GFLOP/s on 2 cores), which widens half weights while packing them.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from merger.engine import native

BLOCKED_MIN_ROWS = 8  # below this (decode) a matmul is memory-bound: the native GEMV, else F.linear
_BLOCK_ELEMS = 1 << 20  # weight elements per block: 4 MiB in float32, fits in L2/L3 with the activations


@functools.cache
def _native_half(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # private probe gone in some torch build: assume slow
        return False


def slow_half(dtype: torch.dtype, device: torch.device) -> bool:
    """True for bf16/fp16 on a CPU without native half-precision math (there, compute in float32)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _native_half(dtype)


def use_blocked(x: torch.Tensor) -> bool:
    """True when a matmul of `x` (rows = all leading dims) should take the blocked float32 path."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.dtype != torch.float32 and not slow_half(x.dtype, x.device):
        return False  # AMX / AVX512-BF16 machines: oneDNN's own half GEMM is the fast one
    return x.numel() // max(x.shape[-1], 1) >= BLOCKED_MIN_ROWS


def _native_kernel(x: torch.Tensor, w: torch.Tensor, rows: int):
    """The native kernel for this call (gemv below BLOCKED_MIN_ROWS rows, else gemm), or None: CPU only;
    half-precision weights on a CPU without native half math; float32 prefill only where MKL has AVX2."""
    if x.dtype != w.dtype or w.dim() != 2 or w.stride(1) != 1 or x.device.type != "cpu":
        return None
    if x.shape[-1] != w.shape[1]:
        return None  # F.linear raises torch's usual shape error
    if x.dtype != torch.float32 and not slow_half(x.dtype, x.device):
        return None  # AMX / AVX512-BF16 machines: oneDNN's own half-precision kernels
    if rows < BLOCKED_MIN_ROWS:
        return native.gemv_kernel(x.dtype)
    if x.dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() != "AVX2":
        return None  # float32 prefill: gemm matched or beat MKL by up to 20% on AVX2; AVX-512 MKL is twice as wide
    return native.gemm_kernel(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T (+ b): the result is in `out_dtype` (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    rows = math.prod(x.shape[:-1])
    kernel = _native_kernel(x, w, rows)
    if kernel is not None and out_dtype in (torch.float32, x.dtype):
        x2 = x.reshape(rows, x.shape[-1])
        if rows < BLOCKED_MIN_ROWS:  # decode: x's conversion, bias and rounding happen inside the one call
            y = native.gemv(x2.contiguous(), w, kernel, b, out_dtype)
        else:
            y = native.gemm(x2.float().contiguous(), w, kernel, b, out_dtype)
        return y.view(*x.shape[:-1], w.shape[0])
    if not use_blocked(x):
        y = F.linear(x, w, b)
        return y if y.dtype == out_dtype else y.to(out_dtype)
    x32t = x.reshape(-1, x.shape[-1]).float().t()                     # [K, rows]
    n = w.shape[0]
    # out.T block by block: each block's rows are contiguous, so mm can write them in place
    out_t = torch.empty(n, x32t.shape[1], dtype=torch.float32, device=x.device)
    step = max(1, _BLOCK_ELEMS // w.shape[1])
    for s in range(0, n, step):
        torch.mm(w[s:s + step].float(), x32t, out=out_t[s:s + step])
    if b is not None:
        out_t += b.float()[:, None]
    # transposed and rounded in one pass
    out = torch.empty(rows, n, dtype=out_dtype, device=x.device).copy_(out_t.t())
    return out.view(*x.shape[:-1], n)
