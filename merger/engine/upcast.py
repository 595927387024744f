"""Float32 GEMM over upcast weight blocks: out.T = W_block @ x.T, one row block of the weight at a time, so a
half-precision weight is never widened whole (a block of 4 MiB in float32 stays in L2/L3 with the
activations). One of the prefill candidates calibrate.py times and matmul.py dispatches to."""
from __future__ import annotations

import math

import torch

BLOCK_ELEMS = 1 << 20  # weight elements per block


def blocked(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out.T = W_block @ x.T in float32, block by block, rounded to out_dtype once."""
    rows = math.prod(x.shape[:-1])
    x32t = x.reshape(-1, x.shape[-1]).float().t()                     # [K, rows]
    n = w.shape[0]
    # out.T block by block: each block's rows are contiguous, so mm can write them in place
    out_t = torch.empty(n, x32t.shape[1], dtype=torch.float32, device=x.device)
    step = max(1, BLOCK_ELEMS // max(w.shape[1], 1))
    for s in range(0, n, step):
        torch.mm(w[s:s + step].float(), x32t, out=out_t[s:s + step])
    if b is not None:
        out_t += b.float()[:, None]
    # transposed and rounded in one pass
    out = torch.empty(rows, n, dtype=out_dtype, device=x.device).copy_(out_t.t())
    return out.view(*x.shape[:-1], n)
