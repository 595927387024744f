"""Spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion curves",
doi:10.1145/325165.325242), as model merging uses it: SLERP from the base to one other model, and
NuSLERP (mergekit's weight-driven variant, optionally on task vectors and per row).

Angles come from the normalised vectors; the interpolation weights apply to the raw tensors, so
norms interpolate too. Nearly colinear vectors (|cos θ| > 0.9995) fall back to plain lerp.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict

from merger.methods.base import MergeContext, MergeMethod
from merger.methods.reduce import dot, norm

COLINEAR = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, cos: float) -> tuple[float, float]:
    """(s0, s1) with slerp(v0, v1) = s0·v0 + s1·v1 for normalised cosine `cos`."""
    if abs(cos) > COLINEAR:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin = math.sin(theta)
    return math.sin((1 - t) * theta) / sin, math.sin(t * theta) / sin


def slerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of two tensors treated as single vectors."""
    n0, n1 = norm(v0), norm(v1)
    # A (near-)zero vector has no direction: like a tensor left unnormalised, its cosine is ~0.
    cos = dot(v0, v1) / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
    s0, s1 = slerp_coefficients(t, cos)
    out = v0 * s0
    return out.add_(v1, alpha=s1)


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int) -> torch.Tensor:
    """SLERP of each vector running along `dim` (a 1-D tensor is one vector)."""
    if v0.dim() < 2:
        return slerp_flat(t, v0, v1)
    a, b = (v.movedim(dim, -1) for v in (v0, v1))
    af, bf = (x if x.dtype in (torch.float32, torch.float64) else x.float() for x in (a, b))
    cos = (af * bf).sum(-1, keepdim=True)
    cos.div_(torch.linalg.vector_norm(af, dim=-1, keepdim=True).clamp_min(EPS))
    cos.div_(torch.linalg.vector_norm(bf, dim=-1, keepdim=True).clamp_min(EPS))
    cos.clamp_(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = cos.abs() > COLINEAR
    s0 = torch.where(colinear, 1.0 - t, torch.sin((1 - t) * theta) / sin)
    s1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    out = a * s0.to(a.dtype)
    out.add_(b * s1.to(b.dtype))
    return out.movedim(-1, dim).contiguous()


class Slerp(MergeMethod):
    name = "slerp"
    description = "Spherical interpolation from base_model (t = 0) to the other model (t = 1)"
    reference = "https://doi.org/10.1145/325165.325242"
    base = "required"
    min_models = max_models = 1

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        t: float

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        return slerp_flat(params.t, base, tensors[0])


class NuSlerp(MergeMethod):
    name = "nuslerp"
    description = "SLERP of two models with t = w2/(w1+w2); with a base_model, of their task vectors"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp"
    base = "optional"
    min_models = max_models = 2

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        nuslerp_flatten: bool = True
        # mergekit's convention: true interpolates the vectors along dim 0, false those along the last dim.
        nuslerp_row_wise: bool = False

    class ModelParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float

    @classmethod
    def check_models(cls, n: int, has_base: bool) -> None:
        if n != 2:
            raise ValueError(f"nuslerp merges exactly 2 models (plus an optional base_model), got {n}")

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        w0, w1 = model_params[0].weight, model_params[1].weight
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        v0, v1 = tensors
        if base is not None:
            v0, v1 = v0 - base, v1 - base
        if params.nuslerp_flatten:
            out = slerp_flat(t, v0, v1)
        else:
            out = slerp_rows(t, v0, v1, dim=0 if params.nuslerp_row_wise else -1)
        return out.add_(base) if base is not None else out
