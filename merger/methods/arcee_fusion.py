"""Arcee Fusion (mergekit v0.1, https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration):
take the other model's value only where its change from the base is an outlier in importance.
Per row r (the last dim): KLᵣ = max(0, Σ (p+ε)·log((p+ε)/(q+ε))), p = softmax(θᵣ), q = softmax(θ_bᵣ),
ε = 1e-8 (in float64); importance s = |θ − θ_b|·KLᵣ; T = Q₂ + 1.5·(Q₃ − Q₁), Qₖ the sorted s at index
⌊k·(n−1)/4⌋ over the whole tensor; result θ where s ≥ T, else θ_b. Streamed in row blocks.
"""
from __future__ import annotations

import torch

from merger.methods import sparsify
from merger.methods.base import MergeContext, MergeMethod

_EPS = 1e-8
_SAMPLE = 1 << 16   # about this many scores bracket each quantile before the counting passes


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The view the softmax runs over: one row per vector along the last dim."""
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    description = "Take the other model's entries whose change (|Δ| × row KL divergence) is an outlier"
    reference = "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration"
    base = "required"
    min_models = max_models = 1

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        if base.numel() == 0:
            return base.clone()
        work = torch.float64 if base.dtype == torch.float64 else torch.float32
        rows_b, rows_t = _rows(base), _rows(tensors[0])
        blocks = sparsify.row_blocks(rows_b)
        kl = torch.cat([self._row_kl(rows_t[sl], rows_b[sl]) for sl in blocks]).to(work)

        def scores(rows) -> torch.Tensor:   # rows: a slice or an index tensor
            return (rows_t[rows].to(work) - rows_b[rows].to(work)).abs_().mul_(kl[rows, None])

        threshold = self._threshold(scores, blocks, rows_b.shape, work)
        out = torch.empty_like(base)
        rows_out = _rows(out)
        for sl in blocks:
            rows_out[sl] = torch.where(scores(sl) >= threshold, rows_t[sl], rows_b[sl])
        return out

    @staticmethod
    def _row_kl(t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # In float64: nearby models' KL is a small difference of logs; float32 loses ~1e-3 of it, bf16 all.
        p = torch.softmax(t.double(), dim=-1).add_(_EPS)
        q = torch.softmax(b.double(), dim=-1).add_(_EPS)
        # A KL divergence is >= 0 (the ε shift scales both sides alike); only rounding goes below.
        return (p * (p.log() - q.log())).sum(-1).clamp_(min=0)

    @staticmethod
    def _threshold(scores, blocks: list[slice], shape: torch.Size, work: torch.dtype) -> torch.Tensor:
        """Q₂ + 1.5·(Q₃ − Q₁) of all scores, each quantile an exact order statistic found by counting."""
        n_rows, width = shape
        n = n_rows * width
        sample = sparsify.keys_of(scores(torch.arange(0, n_rows, max(1, n // _SAMPLE))))
        key_dtype = sample.dtype

        def blocks_keys():
            return (sparsify.keys_of(scores(sl)) for sl in blocks)

        def order_stat(j: int) -> torch.Tensor:       # the j-th smallest score, from 0
            if j == 0:
                return min((scores(sl).min() for sl in blocks), key=float)
            cut = sparsify.find_cut(blocks_keys, sample, n, n - j)   # the n − j largest end at index j
            return torch.tensor(cut.thr, dtype=key_dtype).view(work)

        q1, q2, q3 = (order_stat(k * (n - 1) // 4) for k in (1, 2, 3))
        # In the work dtype, as the scores are compared with it: no second rounding of T.
        return q2 + 1.5 * (q3 - q1)
