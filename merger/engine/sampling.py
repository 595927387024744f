"""Next-token choice from float32 logits: greedy (temperature 0), or temperature + top-k + top-p sampling."""
from __future__ import annotations

import torch

from merger.errors import MergerError


class SamplingError(MergerError):
    """A sampling parameter is out of range."""


def check_params(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise SamplingError(f"temperature {temperature} is negative; use 0 for greedy or a positive value")
    if top_k is not None and top_k < 0:
        raise SamplingError(f"top_k {top_k} is negative; use 0 (off) or a positive number of tokens")
    if top_p is not None and not 0 < top_p <= 1:
        raise SamplingError(f"top_p {top_p} is outside (0, 1]; use e.g. 0.9, or 1 for off")


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
