"""Passthrough: copy the single input tensor, optionally scaled — the frankenmerge building block."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from merger.methods.base import MergeContext, MergeMethod


class Passthrough(MergeMethod):
    name = "passthrough"
    description = "Copy one model's tensors (stack layer ranges with slices)"
    reference = "https://github.com/arcee-ai/mergekit#passthrough"
    min_models = 1
    max_models = 1

    class ModelParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 1.0

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        scale = model_params[0].scale
        return tensors[0] if scale == 1.0 else tensors[0] * scale
