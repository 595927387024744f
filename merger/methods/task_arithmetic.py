"""The task-vector family: task arithmetic (Ilharco et al. 2023, arXiv:2212.04089), TIES
(Yadav et al. 2023, arXiv:2306.01708), DARE (Yu et al. 2024, arXiv:2311.03099), Model Breadcrumbs
(Davari & Belilovsky 2023, arXiv:2312.06795) and DELLA (Deep et al. 2024, arXiv:2406.11617).

Each is θ_b + λ · Σ wᵢ·sᵢ·(mᵢ ⊙ Δᵢ) [÷ divisor]: a sparsifying mask mᵢ with L1 rescale sᵢ,
optionally a TIES sign election, differing only in the mask and the defaults.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from merger.methods import sparsify
from merger.methods.base import MergeContext, MergeMethod
from merger.methods.reduce import l1_norm


class FamilyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False
    rescale: bool = False
    # Masks are always one byte per element here; accepted so mergekit recipes run unchanged.
    int8_mask: bool = False


class WeightDensity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float
    density: float = Field(1.0, ge=0, le=1)


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    description = "Base plus the weighted sum of task vectors (density < 1 keeps the largest entries)"
    reference = "https://arxiv.org/abs/2212.04089"
    base = "required"

    # "magnitude" | "random" | "outliers" | "rank": how each task vector is thinned when density < 1.
    sparsifier: ClassVar[str] = "magnitude"
    # True: TIES "sum" sign election; only entries agreeing with the elected sign are merged.
    elect_sign: ClassVar[bool] = False

    class Params(FamilyParams):
        pass

    ModelParams = WeightDensity

    def mask(self, delta: torch.Tensor, mp: BaseModel, ctx: MergeContext) -> torch.Tensor | None:
        if self.sparsifier == "magnitude":
            return sparsify.magnitude_mask(delta, mp.density)
        if self.sparsifier == "random":
            return sparsify.random_mask(delta, mp.density, ctx.generator)
        if self.sparsifier == "outliers":
            return sparsify.outlier_mask(delta, mp.density, mp.gamma)
        return sparsify.rank_sampling_mask(delta, mp.density, mp.epsilon, ctx.generator)

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        # Pass 1: thin and rescale each task vector, one at a time, into `acc` (the weighted sum,
        # which is also the TIES election). Only the bool masks are kept, never N full deltas.
        # Half-precision inputs accumulate in float32: one rounding at the end, not one per model.
        work = torch.float32 if base.dtype in (torch.bfloat16, torch.float16) else base.dtype
        acc = torch.zeros(base.shape, dtype=work)
        masks: list[torch.Tensor | None] = []
        scales: list[float] = []
        for t, mp in zip(tensors, model_params):
            delta = t - base
            mask = self.mask(delta, mp, ctx)
            scale = 1.0
            if mask is not None:
                before = l1_norm(delta) if params.rescale else 0.0
                delta.mul_(mask)
                if params.rescale:
                    scale = sparsify.l1_rescale(before, l1_norm(delta))
            acc.add_(delta, alpha=mp.weight * scale)
            masks.append(mask)
            scales.append(scale)
            del delta
        if not self.elect_sign:
            if params.normalize:
                total = sum(mp.weight for mp in model_params)
                acc.div_(total if abs(total) >= 1e-8 else 1.0)
            return acc.mul_(params.lambda_).add_(base).to(base.dtype)

        # Pass 2 (TIES): majority sign = sign of the weighted sum (>= 0 counts as +); an entry of
        # model i agrees when sign(wᵢ·Δᵢ) equals it, so trimmed (zero) entries never count.
        positive = acc >= 0
        out = acc.zero_()
        divisor = torch.zeros_like(acc) if params.normalize else None
        for t, mp, mask, scale in zip(tensors, model_params, masks, scales):
            if mp.weight == 0:
                continue
            delta = t - base
            if mask is not None:
                delta.mul_(mask)
            want_positive = positive if mp.weight > 0 else ~positive
            agree = torch.where(want_positive, delta > 0, delta < 0)
            delta.mul_(agree)
            out.add_(delta, alpha=mp.weight * scale)
            if divisor is not None:
                divisor.add_(agree, alpha=mp.weight)
            del delta, agree
        if divisor is not None:
            out.div_(divisor.masked_fill_(divisor == 0, 1.0))
        return out.mul_(params.lambda_).add_(base).to(base.dtype)


class Ties(TaskArithmetic):
    name = "ties"
    description = "Trim task vectors to their largest entries, elect a sign per entry, average the agreeing ones"
    reference = "https://arxiv.org/abs/2306.01708"
    elect_sign = True

    class Params(FamilyParams):
        normalize: bool = True


class DareLinear(TaskArithmetic):
    name = "dare_linear"
    description = "Drop task-vector entries at random (keep with p = density), rescale, add"
    reference = "https://arxiv.org/abs/2311.03099"
    sparsifier = "random"

    class Params(FamilyParams):
        rescale: bool = True


class DareTies(DareLinear):
    name = "dare_ties"
    description = "DARE random drop and rescale, then TIES sign election"
    elect_sign = True


class GammaDensity(WeightDensity):
    gamma: float = Field(0.01, ge=0, le=1)


class Breadcrumbs(TaskArithmetic):
    name = "breadcrumbs"
    description = "Drop the largest gamma fraction and the smallest entries of each task vector, add"
    reference = "https://arxiv.org/abs/2312.06795"
    sparsifier = "outliers"
    ModelParams = GammaDensity


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    description = "Breadcrumbs outlier trimming, then TIES sign election"
    elect_sign = True


class EpsilonDensity(WeightDensity):
    epsilon: float = Field(0.15, ge=0)

    @model_validator(mode="after")
    def _inside_unit_interval(self) -> EpsilonDensity:
        # density 0 and 1 short-circuit (nothing / everything kept), so only 0 < density < 1 needs room.
        if 0 < self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ValueError(f"della needs 0 < density ± epsilon < 1, got density {self.density} and "
                             f"epsilon {self.epsilon}; lower epsilon or move density away from 0 and 1")
        return self


class Della(TaskArithmetic):
    name = "della"
    description = "Keep entries with a probability rising with their magnitude rank per row, rescale, TIES election"
    reference = "https://arxiv.org/abs/2406.11617"
    sparsifier = "rank"
    elect_sign = True
    ModelParams = EpsilonDensity

    class Params(FamilyParams):
        normalize: bool = True
        rescale: bool = True


class DellaLinear(Della):
    name = "della_linear"
    description = "DELLA rank-based sampling and rescale, then a plain weighted sum"
    elect_sign = False

    class Params(FamilyParams):
        rescale: bool = True


FAMILY: tuple[type[TaskArithmetic], ...] = (TaskArithmetic, Ties, DareLinear, DareTies, Breadcrumbs,
                                            BreadcrumbsTies, Della, DellaLinear)
