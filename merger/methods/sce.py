"""SCE: Select, Calculate, Erase (Wan et al. 2024, FuseChat / "Knowledge Fusion of Chat LLMs",
arXiv:2408.07990): keep the entries whose task vectors vary most across models, weight each model
by the mean square of its (selected) task vector, erase minority-sign entries, average.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merger.methods.base import MergeContext, MergeMethod
from merger.methods.reduce import dot
from merger.methods.sparsify import top_k_mask


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

        def delta(i: int) -> torch.Tensor:
            d = tensors[i] - base
            return d.mul_(select) if select is not None else d

        # Select: the top select_topk fraction of the entries with non-zero variance across models.
        select = None
        acc = torch.zeros_like(base)
        for i in range(n):
            acc.add_(tensors[i] - base)
        if params.select_topk < 1:
            mean = acc.div(n)
            var = torch.zeros_like(base)
            for i in range(n):
                var.add_(delta(i).sub_(mean).square_())
            del mean
            k = int(params.select_topk * int(torch.count_nonzero(var)))
            select = top_k_mask(var, k)
            del var
            acc.zero_()
            for i in range(n):
                acc.add_(delta(i))
        # Calculate: per-model weight ∝ mean(Δᵢ²) of the selected task vectors.
        energy = []
        for i in range(n):
            d = delta(i)
            energy.append(dot(d, d) / d.numel())
            del d
        total = sum(energy)
        weights = [1.0 / n] * n if total == 0 else [e / total for e in energy]
        # Erase: an entry counts for model i only if its sign matches that of Σ Δⱼ (>= 0 counts as +).
        positive = acc >= 0
        out = acc.zero_()
        divisor = torch.zeros_like(base)
        for i, w in enumerate(weights):
            d = delta(i)
            agree = torch.where(positive, d > 0, d < 0)
            out.add_(d.mul_(agree), alpha=w)
            divisor.add_(agree, alpha=w)
            del d, agree
        out.div_(divisor.masked_fill_(divisor == 0, 1.0))
        return out.add_(base)
