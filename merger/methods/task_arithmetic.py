"""Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): θ_b + λ · Σ wᵢ(θᵢ − θ_b)."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merger.methods.base import MergeContext, MergeMethod


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    description = "Base plus the weighted sum of task vectors"
    reference = "https://arxiv.org/abs/2212.04089"
    base = "required"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        lambda_: float = Field(1.0, alias="lambda")
        normalize: bool = False

    class ModelParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        delta = torch.zeros_like(base)
        for p, t in zip(model_params, tensors):
            delta.add_(t - base, alpha=p.weight)
        if params.normalize:
            total = sum(p.weight for p in model_params)
            if abs(total) > 1e-12:
                delta.div_(total)
        return base + params.lambda_ * delta
