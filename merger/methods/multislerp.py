"""Multi-SLERP: barycentric interpolation of several tensors on the hypersphere (C. Goddard,
"Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; the spherical
barycentre of Buss & Fillmore 2001, doi:10.1145/502122.502124, in one tangent-space step).

Map the unit vectors to the tangent space at their normalised weighted mean (orthogonal
projection), average there, map back with the exponential map, scale by the weighted mean norm.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from merger.methods.base import MergeContext, MergeMethod
from merger.methods.reduce import dot, norm


class MultiSlerp(MergeMethod):
    name = "multislerp"
    description = "Barycentric SLERP of any number of models (of task vectors when base_model is given)"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    base = "optional"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        normalize_weights: bool = True
        eps: float = Field(1e-8, gt=0)

    class ModelParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float

    @classmethod
    def check_params(cls, params, model_params) -> None:
        if len(model_params) > 1 and params.normalize_weights and abs(sum(p.weight for p in model_params)) < 1e-12:
            raise ValueError("weights sum to 0 with normalize_weights: true; change the weights")

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0].clone()
        weights = [mp.weight for mp in model_params]
        if params.normalize_weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        eps = params.eps

        def vec(i: int) -> torch.Tensor:
            return tensors[i] if base is None else tensors[i] - base

        # Weighted mean of the unit vectors, one tensor at a time (no stacking).
        norms = []
        mean = torch.zeros_like(tensors[0])
        for i, w in enumerate(weights):
            v = vec(i)
            norms.append(norm(v))
            # Unit vector first, then weight (no fused multiply-add): antipodal inputs cancel exactly.
            mean.add_(torch.div(v, norms[i] + eps).mul_(w))
            del v
        mean_norm = norm(mean)
        if mean_norm < eps:
            if len(tensors) == 2:  # antipodal pair: the sphere gives no direction, interpolate linearly
                out = vec(0).mul_(weights[0]) if base is not None else tensors[0] * weights[0]
                out.add_(vec(1), alpha=weights[1])
                return out.add_(base) if base is not None else out
            raise ValueError("the weighted unit vectors cancel out (antipodal models with balancing weights); "
                             "change the weights")
        mean.div_(mean_norm)
        # Tangent vectors uᵢ − (uᵢ·m)m average to α·m, α = |Σ wᵢuᵢ| − Σ wᵢ(uᵢ·m): in exact arithmetic
        # 0, so the exponential map returns m; kept to follow the construction (and its rounding).
        alpha = mean_norm - sum(w * dot(vec(i), mean) / (norms[i] + eps) for i, w in enumerate(weights))
        tangent_norm = abs(alpha) + eps
        scale = math.cos(tangent_norm) + alpha * math.sin(tangent_norm) / tangent_norm
        out = mean.mul_(scale * sum(w * n for w, n in zip(weights, norms)))
        return out.add_(base) if base is not None else out
