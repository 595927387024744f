"""RAM and RAM+ (Reinforced Agent Merging, arXiv:2601.13572) for the sparse task vectors of RL agents.
An entry of Δᵢ = θᵢ − θ_b is active (aᵢ = 1) when |Δᵢ| > epsilon; c = Σ aᵢ. ram: θ_b + Σᵢ aᵢΔᵢ / max(c, 1).
ramplus_tl: θ_b + Σᵢ aᵢΔᵢ·(λᵢ if c = 1 else 1/c), λᵢ = 1 + r·min(Sᵢ/Uᵢ, α), Sᵢ / Uᵢ the counts of model
i's active entries in this tensor with c > 1 / c = 1 (λᵢ = 1 if Uᵢ = 0). Streamed in row blocks (ramplus_tl
counts first); deltas and sums run in float32 for 16-bit inputs.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from merger.methods import sparsify
from merger.methods.base import MergeContext, MergeMethod


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # 16-bit inputs: deltas and sums in float32, so a unique entry comes back as the model's own value.
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class Ram(MergeMethod):
    name = "ram"
    description = "Keep each entry's change where one model made it, average where several did"
    reference = "https://arxiv.org/abs/2601.13572"
    base = "required"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        epsilon: float = Field(1e-5, ge=0)

    def blocks(self, tensors, base, epsilon: float) -> Iterator[tuple[slice, torch.Tensor, list, list, torch.Tensor]]:
        """Per row block: (rows, base block, deltas, active masks, active count), in the work dtype."""
        work = _work_dtype(base.dtype)
        rows_b = sparsify.rows_of(base)
        rows_t = [sparsify.rows_of(t) for t in tensors]
        for sl in sparsify.row_blocks(rows_b):
            b = rows_b[sl].to(work)
            ds = [r[sl].to(work) - b for r in rows_t]
            active = [d.abs() > epsilon for d in ds]
            count = torch.zeros(b.shape, dtype=torch.int32, device=b.device)
            for a in active:
                count += a
            yield sl, b, ds, active, count

    def unique_scales(self, tensors, base, params) -> list[float]:
        """λᵢ, the factor on model i's unique entries: 1 for plain RAM."""
        return [1.0] * len(tensors)

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        scales = self.unique_scales(tensors, base, params)
        out = torch.empty_like(base)
        rows_out = sparsify.rows_of(out)
        for sl, b, ds, active, count in self.blocks(tensors, base, params.epsilon):
            unique = count == 1
            acc = torch.zeros_like(b)
            for d, a, lam in zip(ds, active, scales):
                term = d.mul_(a)
                if lam != 1.0:
                    term.add_(term * unique, alpha=lam - 1.0)
                acc.add_(term)
            rows_out[sl] = acc.div_(count.clamp_(min=1)).add_(b)
        return out


class RamPlusTL(Ram):
    name = "ramplus_tl"
    description = "RAM with each model's unique entries scaled up by its shared/unique ratio in the tensor"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        r: float = Field(0.1, ge=0)
        alpha: float = Field(0.2, ge=0)
        epsilon: float = Field(1e-5, ge=0)

    def unique_scales(self, tensors, base, params) -> list[float]:
        shared = [0] * len(tensors)
        unique = [0] * len(tensors)
        for _sl, _b, _ds, active, count in self.blocks(tensors, base, params.epsilon):
            many, one = count > 1, count == 1
            for i, a in enumerate(active):
                shared[i] += int(torch.count_nonzero(a & many))
                unique[i] += int(torch.count_nonzero(a & one))
        # A model with no unique entry has nothing to scale; its ratio is undefined, not infinite.
        return [1.0 + params.r * min(s / u, params.alpha) if u else 1.0 for s, u in zip(shared, unique)]
