"""`linear`: F.linear, except that half-precision matmuls with many rows run in float32 on CPUs without
native bf16/fp16 GEMM (AVX2-only x86: torch then computes a 64-row bf16 GEMM ~4x slower than fp32).

Weights are upcast in row blocks small enough to stay in cache, so no full float32 copy is ever made.
Few-row calls (decode) stay in half precision: they are memory-bound and half the bytes win there.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

UPCAST_MIN_ROWS = 8  # measured crossover on a 2-core AVX2 EPYC (bf16 M-row GEMM costs ~M GEMVs)
_BLOCK_ELEMS = 1 << 19  # 2 MiB of float32 per weight block: stays in cache between convert and mm


@functools.cache
def _native_half(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # private probe gone in some torch build: assume slow
        return False


def needs_upcast(x: torch.Tensor) -> bool:
    """True when a matmul of `x` (rows = all leading dims) is faster in float32 than in its own dtype."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cpu":
        return False
    return x.numel() // max(x.shape[-1], 1) >= UPCAST_MIN_ROWS and not _native_half(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T (+ b): the result is in `out_dtype` (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    if not needs_upcast(x):
        y = F.linear(x, w, b)
        return y if y.dtype == out_dtype else y.to(out_dtype)
    x32t = x.reshape(-1, x.shape[-1]).float().t()
    n = w.shape[0]
    # Computing out.T block by block keeps each block's rows contiguous for mm(out=...).
    out_t = torch.empty(n, x32t.shape[1], dtype=torch.float32, device=x.device)
    step = max(1, _BLOCK_ELEMS // w.shape[1])
    for s in range(0, n, step):
        torch.mm(w[s:s + step].float(), x32t, out=out_t[s:s + step])
    if b is not None:
        out_t += b.float()[:, None]
    out = out_t.t().to(out_dtype, memory_format=torch.contiguous_format)
    return out.reshape(*x.shape[:-1], n)
