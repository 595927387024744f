"""Whole-tensor reductions (dot product, L2 and L1 norms) that stay accurate on tensors of
hundreds of millions of elements and allocate only small temporaries: they run chunk by chunk
in float32 (float64 for float64 inputs) and accumulate the chunks in a Python float. A chunk is
summed by torch's own reduction, not a BLAS dot: BLAS sums in an order that depends on the data's
address and the calling thread, so a merge would differ in its last bits between runs."""
from __future__ import annotations

import math

import torch

_CHUNK = 1 << 18


def _chunks(*tensors: torch.Tensor):
    flat = [t.reshape(-1) for t in tensors]
    for i in range(0, flat[0].numel(), _CHUNK):
        parts = [f[i:i + _CHUNK] for f in flat]
        if parts[0].dtype not in (torch.float32, torch.float64):
            parts = [p.float() for p in parts]
        yield parts


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b over all elements."""
    return math.fsum(float((x * y).sum()) for x, y in _chunks(a, b))


def norm(a: torch.Tensor) -> float:
    """Euclidean norm of the flattened tensor."""
    return math.sqrt(max(dot(a, a), 0.0))


def l1_norm(a: torch.Tensor) -> float:
    """Σ |a| over all elements."""
    return math.fsum(float(x.abs().sum()) for (x,) in _chunks(a))
