"""SCE: Select, Calculate, Erase (Wan et al. 2024, FuseChat / "Knowledge Fusion of Chat LLMs",
arXiv:2408.07990): keep the entries whose task vectors vary most across models, weight each model
by the mean square of its (selected) task vector, erase minority-sign entries, average.
Streamed in row blocks like the task-vector family: no whole-tensor temporaries.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merger.methods import sparsify
from merger.methods.base import MergeContext, MergeMethod
from merger.methods.reduce import dot


class Sce(MergeMethod):
    name = "sce"
    description = "Select high-variance entries, weight models by task-vector energy, erase minority signs"
    reference = "https://arxiv.org/abs/2408.07990"
    base = "required"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        select_topk: float = Field(1.0, ge=0, le=1)
        # Masks are always one byte per element here; accepted so mergekit recipes run unchanged.
        int8_mask: bool = False

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        n = len(tensors)
        rows_b = sparsify.rows_of(base)
        rows_t = [sparsify.rows_of(t) for t in tensors]
        blocks = sparsify.row_blocks(rows_b)

        def deltas(sl: slice) -> list[torch.Tensor]:
            return [r[sl] - rows_b[sl] for r in rows_t]

        def variance(ds: list[torch.Tensor]) -> torch.Tensor:
            mean = sum(ds[1:], ds[0].clone()).div_(n)
            return sum((d - mean).square_() for d in ds).div_(n)

        # Select: the top select_topk fraction of the entries whose variance across models is non-zero.
        select = None
        if params.select_topk < 1:
            nonzero = sum(int(torch.count_nonzero(variance(deltas(sl)))) for sl in blocks)
            sample = variance([sparsify.strided_sample(t) - sparsify.strided_sample(base) for t in tensors])
            select = sparsify.RankWindow(sparsify.find_cut(
                lambda: (sparsify.keys_of(variance(deltas(sl))) for sl in blocks), sparsify.keys_of(sample),
                base.numel(), int(params.select_topk * nonzero)), None)

        def selected(sl: slice) -> list[torch.Tensor]:
            ds = deltas(sl)
            if select is not None:
                m = select(variance(ds))
                ds = [d.mul_(m) for d in ds]
            return ds

        # Calculate: per-model weight ∝ mean(Δᵢ²) of the selected task vectors.
        energy = [0.0] * n
        if select is not None:
            select.restart()
        for sl in blocks:
            for i, d in enumerate(selected(sl)):
                energy[i] += dot(d, d)
        total = sum(energy)
        weights = [1.0 / n] * n if total == 0 else [e / total for e in energy]
        # Erase: an entry counts for model i only if its sign matches that of Σ Δⱼ (>= 0 counts as +).
        out = torch.empty_like(base)
        rows_out = sparsify.rows_of(out)
        if select is not None:
            select.restart()
        for sl in blocks:
            ds = selected(sl)
            elected = torch.where(sum(ds[1:], ds[0].clone()) >= 0, 1.0, -1.0).to(ds[0].dtype)
            acc = torch.zeros(ds[0].shape, dtype=torch.float32 if base.dtype != torch.float64 else base.dtype,
                              device=ds[0].device)
            divisor = torch.zeros_like(acc)
            for w, d in zip(weights, ds):
                agree = torch.mul(d, elected) > 0
                acc.add_(d.mul_(agree), alpha=w)
                divisor.add_(agree, alpha=w)
            rows_out[sl] = acc.div_(divisor.masked_fill_(divisor == 0, 1.0)).add_(rows_b[sl])
        return out
