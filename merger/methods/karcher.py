"""Karcher mean: the Riemannian centre of mass on the unit hypersphere (Karcher 1977,
doi:10.1002/cpa.3160300502), found by fixed-point iteration of exp(mean of logs), then scaled by
the mean norm of the inputs. Equal weights; no base model.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from merger.methods.base import MergeContext, MergeMethod
from merger.methods.reduce import dot, norm


MAX_ITER = 100_000  # published recipes use up to 20000 (convergence stops far earlier); 1e9 is a hang


class Karcher(MergeMethod):
    name = "karcher"
    description = "Riemannian (Karcher) mean of the models' directions, scaled by their mean norm"
    reference = "https://en.wikipedia.org/wiki/Karcher_mean"
    base = "none"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_iter: int = Field(10, ge=0, le=MAX_ITER)  # bounded: each iteration is a pass over every input
        tol: float = Field(1e-5, gt=0, le=1)

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0].clone()
        tol = params.tol
        norms = [norm(t) for t in tensors]
        scale = sum(norms) / len(norms)
        valid = [i for i, n in enumerate(norms) if n > tol]
        if not valid:
            return torch.zeros_like(tensors[0])
        if len(valid) == 1:
            return tensors[valid[0]] * (scale / norms[valid[0]])
        alpha = 1.0 / len(valid)
        # Unit vectors are tensors[i] / norms[i]; they are never materialised.
        mean = torch.zeros_like(tensors[0])
        for i in valid:
            mean.add_(tensors[i], alpha=alpha / norms[i])
        mean_norm = norm(mean)
        if mean_norm < tol:
            mean = tensors[valid[0]] / norms[valid[0]]
        else:
            mean.div_(mean_norm)
        tangent = torch.empty_like(mean)
        for _ in range(params.max_iter):
            tangent.zero_()
            for i in valid:
                cos = max(-1.0, min(1.0, dot(mean, tensors[i]) / norms[i]))
                theta = math.acos(cos)
                if theta < tol:
                    continue
                # log map at `mean`: θ/sin θ · (u − cos θ · mean)
                k = alpha * theta / math.sin(theta)
                tangent.add_(tensors[i], alpha=k / norms[i]).add_(mean, alpha=-k * cos)
            step = norm(tangent)
            if step < tol:
                break
            mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
            unit = norm(mean)
            if unit > tol:
                mean.div_(unit)
        return mean.mul_(scale)
