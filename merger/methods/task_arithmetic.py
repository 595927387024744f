"""The task-vector family: task arithmetic (Ilharco et al. 2023, arXiv:2212.04089), TIES
(Yadav et al. 2023, arXiv:2306.01708), DARE (Yu et al. 2024, arXiv:2311.03099), Model Breadcrumbs
(Davari & Belilovsky 2023, arXiv:2312.06795) and DELLA (Deep et al. 2024, arXiv:2406.11617).

Each is θ_b + λ · Σ wᵢ·sᵢ·(mᵢ ⊙ Δᵢ) [÷ divisor]: a sparsifying mask mᵢ with L1 rescale sᵢ,
optionally a TIES sign election, differing only in the mask and the defaults. Work is streamed
in row blocks: besides its inputs a merge holds the output and a few block-sized temporaries.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from merger.methods import native, sparsify
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
    writes_out = True

    # "magnitude" | "random" | "outliers" | "rank": how each task vector is thinned when density < 1.
    sparsifier: ClassVar[str] = "magnitude"
    # True: TIES "sum" sign election; only entries agreeing with the elected sign are merged.
    elect_sign: ClassVar[bool] = False

    class Params(FamilyParams):
        pass

    ModelParams = WeightDensity

    def plan(self, deltas, sample: torch.Tensor, rows: tuple[int, int], mp: BaseModel,
             ctx: MergeContext, pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> sparsify.MaskPlan:
        """How model `mp`'s task vector is thinned; `deltas()` streams its `rows` view in blocks, the
        difference of `pair` (the model's tensor and the base) when given."""
        if mp.density >= 1:
            return sparsify.MaskPlan()
        if mp.density <= 0:
            return sparsify.DropAll()
        if self.sparsifier in ("magnitude", "outliers"):
            gamma = mp.gamma if self.sparsifier == "outliers" else 0.0
            return sparsify.magnitude_plan(deltas, sample, rows[0] * rows[1], mp.density, gamma, pair)
        # Each model's mask gets its own generator, seeded from the merge's in model order, so the
        # same mask can be drawn again block by block.
        seed = int(torch.randint(0, 2**62, (), generator=ctx.generator))
        if self.sparsifier == "random":
            return sparsify.RandomKeep(mp.density, seed)
        return sparsify.RankKeep(mp.density, mp.epsilon, seed, rows=rows[0])

    def _prepare(self, tensors, base, params, model_params, ctx):
        """Pass A: per model, its mask plan and L1 rescale factor (streamed, nothing kept)."""
        rows_b = sparsify.rows_of(base)
        rows_t = [sparsify.rows_of(t) for t in tensors]
        blocks = sparsify.row_blocks(rows_b)
        plans, scales = [], []
        for t, rows, mp in zip(tensors, rows_t, model_params):
            def deltas(rows=rows):
                return (rows[sl] - rows_b[sl] for sl in blocks)
            sample = sparsify.strided_sample(t) - sparsify.strided_sample(base)
            plan = self.plan(deltas, sample, tuple(rows_b.shape), mp, ctx, pair=(t, base))
            scale = 1.0
            if params.rescale and type(plan) is not sparsify.MaskPlan:
                before = after = 0.0
                plan.restart()
                for d in deltas():
                    before += l1_norm(d)
                    after += l1_norm(d.mul_(plan(d)))
                scale = sparsify.l1_rescale(before, after)
            plans.append(plan)
            scales.append(scale)
        return rows_b, rows_t, blocks, plans, scales

    def masks(self, tensors, base, params, model_params, ctx: MergeContext) -> list[torch.Tensor | None]:
        """Each model's whole mask (None: keeps everything), as `merge` with the same ctx draws it."""
        *_, plans, _ = self._prepare(tensors, base, params, model_params, ctx)
        return [sparsify.materialize(p, t - base) for p, t in zip(plans, tensors)]

    def merge(self, tensors, base, params, model_params, ctx: MergeContext) -> torch.Tensor:
        rows_b, rows_t, blocks, plans, scales = self._prepare(tensors, base, params, model_params, ctx)
        weights = [mp.weight for mp in model_params]
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
        # Half-precision inputs accumulate in float32: one rounding at the end, not one per model.
        work = torch.float32 if base.dtype in (torch.bfloat16, torch.float16) else base.dtype
        out = ctx.out if ctx.out is not None else torch.empty_like(base)
        rows_out = sparsify.rows_of(out)
        kernel = native.combine_kernel(base.dtype) if base.is_cpu and base.is_contiguous() and all(
            t.is_contiguous() for t in tensors) else None
        alphas = [w * s for w, s in zip(weights, scales)]
        for p in plans:
            p.restart()
        # Pass B, block by block: every temporary is one block, never a whole tensor.
        for sl in blocks:
            b = rows_b[sl]
            if kernel is None:
                deltas = [rows[sl] - b for rows in rows_t]
                masks = [plan(d) for plan, d in zip(plans, deltas)]
            else:
                shape = b.shape
                kmasks = [plan.kernel_mask(shape) or self._bools(plan, rows[sl] - b) for plan, rows in zip(plans, rows_t)]
                if native.combine(kernel, rows_out[sl], b, [rows[sl] for rows in rows_t], kmasks, alphas, weights,
                                  self.elect_sign, params.normalize, divisor, params.lambda_):
                    continue
                deltas = [rows[sl] - b for rows in rows_t]   # a NaN in this block: torch's bits for it
                masks = [km.torch_mask(d) for km, d in zip(kmasks, deltas)]
            rows_out[sl] = self._combine(b, deltas, masks, weights, alphas, work, params, divisor)
        return out

    @staticmethod
    def _bools(plan: sparsify.MaskPlan, delta: torch.Tensor) -> sparsify.KernelMask:
        mask = plan(delta)
        return sparsify.KernelMask("keep") if mask is None else sparsify.KernelMask("bools", bools=mask)

    def _combine(self, b, deltas, masks, weights, alphas, work, params, divisor) -> torch.Tensor:
        """One block in torch: the masked deltas' weighted sum (or TIES election), lambda, plus the base."""
        kept = [d if m is None else d.mul_(m) for d, m in zip(deltas, masks)]
        acc = kept[0].to(work, copy=True).mul_(alphas[0])
        for a, d in zip(alphas[1:], kept[1:]):
            acc.add_(d, alpha=a)
        if self.elect_sign:
            acc = self._elect(acc, kept, weights, alphas, params.normalize)
        elif params.normalize:
            acc.div_(divisor)
        if params.lambda_ != 1:
            acc.mul_(params.lambda_)
        return acc.add_(b)

    @staticmethod
    def _elect(acc, kept, weights, alphas, normalize: bool) -> torch.Tensor:
        """TIES: majority sign = sign of the weighted sum (>= 0 counts as +); an entry of model i
        agrees when sign(wᵢ·Δᵢ) equals it, so trimmed (zero) entries never count."""
        elected = torch.where(acc >= 0, 1.0, -1.0).to(kept[0].dtype)
        out = acc.zero_()
        divisor = torch.zeros_like(acc) if normalize else None
        for w, a, d in zip(weights, alphas, kept):
            if w == 0:
                continue
            # d·elected > 0 exactly when d's sign is the elected one (zeros never agree); flipped for w < 0.
            agree = torch.mul(d, elected)
            agree = agree > 0 if w > 0 else agree < 0
            out.add_(d.mul_(agree), alpha=a)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        if divisor is not None:
            out.div_(divisor.masked_fill_(divisor == 0, 1.0))
        return out


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
