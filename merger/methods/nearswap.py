"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the
other model's value where it is close to the base's, keep the base where they differ much:
w = clamp(t / |θ_b − θ|, 0, 1) elementwise, result w·θ + (1 − w)·θ_b.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merger.methods import sparsify
from merger.methods.base import MergeContext, MergeMethod


class NearSwap(MergeMethod):
    name = "nearswap"
    description = "Per entry, move from the base toward the other model by t / |difference| (at most all the way)"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    base = "required"
    min_models = max_models = 1

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        t: float = Field(gt=0)

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        out = torch.empty_like(base)
        rows_b, rows_t, rows_out = (sparsify.rows_of(x) for x in (base, tensors[0], out))
        for sl in sparsify.row_blocks(rows_b):   # block-sized temporaries only
            diff = rows_t[sl] - rows_b[sl]
            w = diff.abs()
            # Where the models agree exactly (|diff| = 0) the weight is 1; the result is the same value.
            w = torch.where(w == 0, 1.0, torch.clamp(params.t / w, 0.0, 1.0))
            rows_out[sl] = diff.mul_(w).add_(rows_b[sl])
        return out
