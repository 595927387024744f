"""Linear merge ("model soups", Wortsman et al. 2022, arXiv:2203.05482): Σ wᵢθᵢ, ÷ Σ wᵢ if normalize."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from merger.methods import native
from merger.methods.base import MergeContext, MergeMethod


class Linear(MergeMethod):
    name = "linear"
    description = "Weighted average of the models"
    reference = "https://arxiv.org/abs/2203.05482"
    base = "optional"
    base_is_input = True
    writes_out = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        normalize: bool = True

    class ModelParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float

    @classmethod
    def check_params(cls, params, model_params) -> None:
        if params.normalize and abs(sum(p.weight for p in model_params)) < 1e-12:
            raise ValueError("weights sum to 0 with normalize: true; change the weights or set normalize: false")

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        weights = [p.weight for p in model_params]
        if params.normalize:
            total = sum(weights)
            # Normalising the weights first keeps a one-model merge bit-exact (w/w == 1).
            weights = [w / total for w in weights]
        out = native.linear(tensors, weights, ctx.out)   # the same bits as below, in one pass
        if out is not None:
            return out
        # Start from the first product rather than zeros: one pass less over a fresh tensor.
        out = torch.mul(tensors[0], weights[0], out=ctx.out) if ctx.out is not None else tensors[0] * weights[0]
        for w, t in zip(weights[1:], tensors[1:]):
            out.add_(t, alpha=w)
        return out
