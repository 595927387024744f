"""Next-token choice from float32 logits: greedy (temperature 0), or temperature + top-k + top-p sampling."""
from __future__ import annotations

import math

import torch

from merger.errors import MergerError


class SamplingError(MergerError):
    """A sampling parameter is out of range."""


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_params(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int = 0,
                 seed: int | None = None) -> None:
    """SamplingError unless every generation parameter is usable as given. top_k 0 / None and top_p 1 / None
    mean off; a seed is what torch.Generator.manual_seed takes (0 <= seed < 2**64)."""
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise SamplingError(f"temperature {temperature} is not a finite number >= 0; use 0 for greedy or a "
                            "positive value such as 0.8")
    if top_k is not None and (not _count(top_k) or top_k < 0):
        raise SamplingError(f"top_k {top_k} is not a whole number >= 0; use 0 (off) or a positive number of tokens")
    if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):  # NaN fails the comparison too
        raise SamplingError(f"top_p {top_p} is outside (0, 1]; use e.g. 0.9, or 1 for off")
    if not _count(max_new_tokens) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens {max_new_tokens} is not a whole number >= 0; use e.g. 64")
    if seed is not None and (not _count(seed) or not 0 <= seed < 2**64):
        raise SamplingError(f"seed {seed} is outside 0..2**64-1; use a non-negative integer such as 42")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """logits [V] -> one token id. top_k 0/None and top_p None/1 mean off."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the more likely ones already cover top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
