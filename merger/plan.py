"""What a build writes, decided before any tensor is read: a BuildPlan lists every output tensor
(name, shape, saved dtype, and how to compute it from which input tensors) plus the config.json,
tokenizer source and card that go beside them. Both forms plan into it: merges (merger.merge_plan)
and MoE compositions (merger.moe.compose); merger.execute runs any plan the same way."""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merger.io.checkpoint import Checkpoint
from merger.vocab.write import TokenizerFiles


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed: reruns are bit-identical whatever order tensors are computed in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@dataclass
class OutputTensor:
    """One tensor of the output. `compute()` reads its inputs and returns it (any float dtype; the
    executor casts to `dtype`). `sources` are the input tensors it reads, and `blame` names what to
    fix when the result is not finite although they are (a method and its parameters, a recipe field).
    With `writes_out`, `compute(out=t)` may compute into t (shaped and typed as the output) and return it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[..., torch.Tensor]
    sources: list[tuple[Checkpoint, str]] = field(default_factory=list)
    blame: str = ""
    writes_out: bool = False


@dataclass
class BuildPlan:
    """Everything a build writes into its staged folder, in file order."""

    kind: str                                  # "merge" or "moe"
    tensors: list[OutputTensor]
    config: dict[str, Any]                     # config.json, dtype fields already set
    tokenizer: TokenizerFiles                  # the tokenizer files: a model's, maybe edited (vocabulary, template)
    metadata: dict[str, str]                   # the shards' safetensors __metadata__
    card_body: Callable[[], str] | None = None  # None: the merge card, written from the recipe
    prepare: list[Callable[[], None]] = field(default_factory=list)  # run before the first tensor (MoE gates)
    summary: list[str] = field(default_factory=list)  # what `merger validate` reports

    @property
    def total_bytes(self) -> int:
        return sum(t.dtype.itemsize * _numel(t.shape) for t in self.tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
