"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522): interpolate between the average of the fine-tunes and the base with
t = N·cos θ / (1 + (N−1)·cos θ), cos θ the mean pairwise cosine of their task vectors.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from merger.methods.base import MergeContext, MergeMethod
from merger.methods.reduce import dot, norm


def _row_view(x: torch.Tensor) -> torch.Tensor:
    """Rows = vectors along the last dim; a 1-D tensor (norm, bias) is a single row."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1])


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = _row_view(x)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class ModelStock(MergeMethod):
    name = "model_stock"
    description = "Average of the fine-tunes pulled toward the base by their task vectors' mean angle"
    reference = "https://arxiv.org/abs/2403.19522"
    base = "required"
    min_models = 2

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # True: one angle (and t) per row, i.e. per output filter, instead of per tensor.
        filter_wise: bool = False

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        n = len(tensors)
        cos = self._mean_cosine(tensors, base, params.filter_wise)
        denom = 1 + (n - 1) * cos
        # cos = −1/(N−1) makes t infinite; keep the base there rather than emit inf.
        if params.filter_wise:
            t = torch.where(denom.abs() < 1e-12, 0.0, n * cos / denom)
        else:
            t = 0.0 if abs(denom) < 1e-12 else n * cos / denom
        out = torch.zeros_like(base)
        for x in tensors:
            out.add_(x)
        out.div_(n).sub_(base)
        if params.filter_wise:
            _row_view(out).mul_(t.to(out.dtype))
        else:
            out.mul_(t)
        return out.add_(base)

    @staticmethod
    def _mean_cosine(tensors: list[torch.Tensor], base: torch.Tensor, filter_wise: bool):
        """Mean over pairs i < j of cos(Δᵢ, Δⱼ), each clamped to [−1, 1]: a float, or a (rows, 1) tensor."""
        total = 0.0
        pairs = 0
        for i in range(len(tensors)):
            di = tensors[i] - base
            for j in range(i + 1, len(tensors)):
                dj = tensors[j] - base
                if filter_wise:
                    a, b = _rows(di), _rows(dj)
                    nn = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
                    c = ((a * b).sum(-1) / nn.clamp_min(1e-6)).clamp_(-1.0, 1.0)
                else:
                    c = max(-1.0, min(1.0, dot(di, dj) / max(norm(di) * norm(dj), 1e-6)))
                total = total + c
                pairs += 1
                del dj
            del di
        mean = total / pairs
        return mean.unsqueeze(-1) if filter_wise else mean
