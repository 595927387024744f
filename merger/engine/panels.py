"""Weights stored in column panels for decode: an [N, K] matrix kept as [K / P, N, P], panel q holding columns
qP..qP+P-1 of every row (cpu_dots.h `pdots`). A decode matvec then reads one panel's rows as one contiguous
run against x's P-element slice, which stays in L1 beside them. With whole rows, x takes K elements, and from
8 KB of x on it no longer shares L1 with the streaming rows well: a 2-core EPYC read a 5632-wide bf16 matrix
at 0.45-0.9 of a plain read, a 14336-wide one at 0.3-0.7, against 0.85-1.0 for 4 KB panels of the same bytes
(a C loop over 768 MB, alternating, both of the machine's bandwidth states); decode of two hidden-4096 layers
(Llama 3 8B's widths) in bf16 went from 30.3 to 37.8 tok/s, of the hidden-2048 MoE in float32 from 17.5 to 20.6.

Which weights: those the decode step reads (attention, MLP or experts, and an untied output layer) of a model
the step kernel runs, on the CPU, with rows of more than PANEL_BYTES; an embedding (and a tied output)
stays in rows, since a token's lookup reads one. A panelled weight has one dimension more than its plain one:
`linear` (matmul.py) gives it to the native gemv and gemm as it is (the gemm packs its slices from the
panels: the same sums). So weights go into panels only where calibration chose the native gemm for prefill:
where torch's GEMM won (bf16 on a CPU with native bf16, as here), a plain copy per prefill matmul halved
prefill (two hidden-4096 bf16 layers, 128 tokens: 412 -> 192 tok/s), and the weights stay in rows; `plain`
remains the fallback of any other path. They move when a model first decodes (generate.py), not at load, so
scoring and routing (prefill only) never pay the move. `MERGER_PANELS=0` keeps every weight in rows.
"""
from __future__ import annotations

import os

import torch

from merger.engine import calibrate, step, weights

PANEL_BYTES = 4096  # rows of more bytes go into panels of at most this: x's slice and a panel row fit L1


def width(k: int, itemsize: int) -> int:
    """The panel width for rows of k elements: the largest divisor of k, a multiple of 8, whose row fits
    PANEL_BYTES; k itself (plain rows) when rows fit already or no such divisor exists."""
    if k * itemsize <= PANEL_BYTES:
        return k
    for p in range(PANEL_BYTES // itemsize // 8 * 8, 7, -8):
        if k % p == 0:
            return p
    return k


def to_panels(w: torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> [..., K / P, N, P] in a new buffer (on huge pages, as loaded weights are), or w itself
    when its rows need no panels."""
    n, k = w.shape[-2:]
    p = width(k, w.element_size())
    if p == k:
        return w
    view = w.unflatten(-1, (k // p, p)).transpose(-3, -2)  # [..., K / P, N, P], not yet contiguous
    out = weights.empty(view.shape, w.dtype, w.device)
    return out.copy_(view)


def plain(w: torch.Tensor) -> torch.Tensor:
    """[K / P, N, P] -> a contiguous [N, K] copy, for a path that reads rows (not taken after apply)."""
    return w.transpose(0, 1).reshape(w.shape[1], w.shape[0] * w.shape[2])


def enabled() -> bool:
    return os.environ.get("MERGER_PANELS", "1") != "0"


def apply(model) -> None:
    """Put the decode step's weights of `model` in panels, one tensor at a time (each copy replaces the plain
    one at once, so the peak is one tensor more), if panels are on, the step runs the model (step.unsupported)
    and its prefill runs on the native gemm. Weights in panels already stay as they are."""
    if (not enabled() or step.unsupported(model, 1) is not None
            or calibrate.choice(model.dtype, "prefill") != "native"):
        return
    tied = model.output.data_ptr() == model.embed.data_ptr()
    swapped = [_swap(module, name) for layer in model.layers
               for module, names in ((layer.attn, ("wqkv", "wo")), (layer.ffn, ("w13", "w2"))) for name in names]
    if not tied:
        swapped.append(_swap(model, "output"))
    if any(swapped):
        model.cache = None  # a decode step built before points at the plain weights: it goes with the cache


def _swap(module, name: str) -> bool:
    old = getattr(module, name).data  # (each .data is a new tensor object: keep this one)
    new = to_panels(old)
    if new is old:
        return False
    setattr(module, name, torch.nn.Parameter(new, requires_grad=False))
    return True
