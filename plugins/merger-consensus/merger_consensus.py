"""Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model Merging
and Compression", arXiv:2405.07813): task arithmetic that keeps only the weights which at least
k task vectors need (TALL masks), dropping weights only one task needs and weights none needs."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

import merger
from merger.methods.base import MergeContext


class Consensus(merger.MergeMethod):
    name = "consensus"
    description = "Task arithmetic on the weights that at least k task vectors agree are important"
    reference = "https://arxiv.org/abs/2405.07813"
    base = "required"
    min_models = 2

    class Params(BaseModel):
        """Global parameters: one value per output tensor (filters match the output name)."""

        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        lambda_: float = Field(1.0, alias="lambda")  # scales the masked multi-task vector
        k: int = Field(2, ge=0)                      # TALL masks that must keep a weight

    class ModelParams(BaseModel):
        """Per-model parameters (filters match each model's own tensor names)."""

        model_config = ConfigDict(extra="forbid")
        weight: float = 1.0                          # scales this model's task vector
        mask_lambda: float = Field(0.4, ge=0)        # TALL mask threshold; the paper tunes it in [0.2, 0.6]

    def merge(self, tensors: list[torch.Tensor], base: torch.Tensor | None, params: Params,
              model_params: list[ModelParams], ctx: MergeContext) -> torch.Tensor:
        if params.k > len(tensors):
            # ValueError: merger reports it as one line naming the method and the tensor
            raise ValueError(f"k={params.k} but only {len(tensors)} models: every weight would be dropped; "
                             f"lower k")
        assert base is not None  # base = "required": the recipe validator guarantees it
        total = torch.zeros_like(base)  # the multi-task vector Σ wᵢ(θᵢ − θ_b)
        for p, t in zip(model_params, tensors):
            total.add_(t - base, alpha=p.weight)
        # Votes rather than a stack of N masks: memory stays at a few tensors whatever N is.
        votes = torch.zeros(base.shape, dtype=torch.int32)
        for p, t in zip(model_params, tensors):
            delta = p.weight * (t - base)
            votes += delta.abs() >= p.mask_lambda * (total - delta).abs()  # TALL mask of this model
        return base + params.lambda_ * torch.where(votes >= params.k, total, 0.0)


@merger.hookimpl
def merger_register_methods(register) -> None:
    register(Consensus)
