"""The MergeMethod contract: a name, typed parameter models, and one pure tensor function.

`Params` holds global parameters (one value per output tensor, matched against the output
tensor name); `ModelParams` holds per-model ones (matched against each model's own tensor name).
Either may be given in a recipe as a scalar, a gradient list or a list of {filter, value}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass(frozen=True)
class MergeContext:
    """What a method may know besides the tensors: the output name, a seeded generator (on the CPU, so
    draws do not depend on the device), the dtype and the device the tensors are on. The input tensors
    are the method's only for the call: return a new tensor (or one of them), keep no reference. Calls
    for different tensors may run at the same time in different threads. `out`, given only to methods
    that set `writes_out`, is where the result will be saved (the output file's own bytes, of the
    result's shape and `dtype`): a method may compute into it and return it, saving a copy."""

    name: str
    generator: torch.Generator
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")
    out: torch.Tensor | None = None


class MergeMethod:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    # "none": no base_model; "optional"/"required": base passed separately to merge().
    base: ClassVar[Literal["none", "optional", "required"]] = "none"
    # True: a base_model is just one more weighted input (linear); it joins `tensors` if not listed.
    base_is_input: ClassVar[bool] = False
    # Bounds on len(tensors) (the inputs other than a separately passed base).
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    # True: merge() may write its result into ctx.out (see MergeContext).
    writes_out: ClassVar[bool] = False

    Params: ClassVar[type[BaseModel]] = NoParams
    ModelParams: ClassVar[type[BaseModel]] = NoParams

    @classmethod
    def check_models(cls, n: int, has_base: bool) -> None:
        """Raise ValueError if `n` inputs (plus a base if `has_base`) cannot be merged."""
        if cls.base == "required" and not has_base:
            raise ValueError(f"{cls.name} needs a base_model")
        if cls.base == "none" and has_base and not cls.base_is_input:
            raise ValueError(f"{cls.name} takes no base_model; remove it")
        if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
            # With a required base passed separately, count it as mergekit users do: slerp merges 2 models.
            k = 1 if cls.base == "required" and not cls.base_is_input else 0
            lo, hi = cls.min_models + k, None if cls.max_models is None else cls.max_models + k
            want = f"exactly {lo}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            extra = " (base_model included)" if k else (" besides base_model" if has_base and not cls.base_is_input else "")
            noun = "model" if lo == 1 and hi == 1 else "models"
            raise ValueError(f"{cls.name} merges {want} {noun}{extra}, got {n + k}")

    @classmethod
    def check_params(cls, params: BaseModel, model_params: list[BaseModel]) -> None:
        """Raise ValueError if these parameters (one output tensor's, already validated field by field)
        cannot be merged, e.g. weights that sum to 0 with normalize. Called when the build is planned,
        for every tensor, so `merger validate` reports it before any tensor is read."""

    def merge(self, tensors: list[torch.Tensor], base: torch.Tensor | None, params: BaseModel,
              model_params: list[BaseModel], ctx: MergeContext) -> torch.Tensor:
        """Return the merged tensor (same shape as the inputs). Inputs are already in ctx.dtype."""
        raise NotImplementedError
