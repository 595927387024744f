"""Scoring one token sequence on merger's engine in the Hugging Face perplexity guide's strided windows
(`windows`), each run through the KV cache so only scored positions reach lm_head (`logprob_chunks`);
`LogProbs` streams float32 log-probs, re-iterable; `score` / `score_pair` tally NLL, KL(parent ‖ merged)
and top-1 agreement in float64.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from merger.errors import EvalError

CHUNK_BYTES = 128 * 2**20   # float32 logits of one scored chunk: 256 positions of a 128k vocabulary
CACHE_BYTES = 2 * 2**30     # a stream's log-probs are kept for a second consumer up to this size

Progress = Callable[[int, int], None]   # (targets done, targets in total)


@dataclass(frozen=True)
class Window:
    begin: int   # first input position (the window's position 0)
    first: int   # first scored target
    end: int     # one past the last target (and the window's last input)


def stride_of(window: int) -> int:
    return max(1, window // 2)


def windows(n: int, window: int) -> list[Window]:
    """The windows over a sequence of n tokens: targets first..end-1 of each, together 1..n-1 once each.

    stride = window // 2; window k covers inputs [k·stride, k·stride + window) and scores only the targets
    the previous window did not reach, so each target past the first window has >= stride tokens of context.
    """
    if window < 2:
        raise EvalError(f"a window of {window} token(s) scores nothing; give --window 2 or more")
    stride = stride_of(window)
    out: list[Window] = []
    begin, prev = 0, 1  # token 0 has no context and is never a target
    while True:
        end = min(begin + window, n)
        if end > prev:
            out.append(Window(begin, prev, end))
        prev = max(prev, end)
        if end >= n:
            return out
        begin += stride


def chunk_tokens(vocab_size: int, window: int) -> int:
    return max(1, min(window, CHUNK_BYTES // (4 * vocab_size)))


@torch.inference_mode()
def logprob_chunks(model, ids: torch.Tensor, window: int,
                   progress: Progress | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first target position, float32 log-probs [T, V]) pieces covering targets 1..n-1 in order. The
    pieces depend only on (n, window, vocab size), so two models' streams over the same ids line up.

    Per window: its context inputs fill the cache in one pass whose lm_head sees only the last position,
    then the scored inputs run in chunks of chunk_tokens, so a chunk's logits stay within CHUNK_BYTES."""
    n = int(ids.shape[0])
    step = chunk_tokens(model.config.vocab_size, window)
    ids = ids.to(model.device)
    model.setup_cache(1, window)
    try:
        for w in windows(n, window):
            # inputs begin..first-1 fill the cache; the last of them predicts `first`
            logits = model(ids[None, w.begin:w.first], start_pos=0, last_only=True)[0]   # [1, V]
            yield w.first, F.log_softmax(logits.float(), dim=-1)
            pos = w.first
            while pos < w.end - 1:  # inputs pos..stop-1 predict targets pos+1..stop
                stop = min(pos + step, w.end - 1)
                logits = model(ids[None, pos:stop], start_pos=pos - w.begin)[0]           # [T, V]
                yield pos + 1, F.log_softmax(logits.float(), dim=-1)
                pos = stop
            if progress is not None:
                progress(w.end - 1, n - 1)
    finally:
        model.cache = None  # free the KV memory


class LogProbs:
    """One model's log-prob stream over one token sequence, iterable more than once: the pieces are kept
    after the first full pass when they fit in `cache_bytes`, else the model runs again."""

    def __init__(self, model, ids: list[int] | torch.Tensor, window: int, cache_bytes: int = CACHE_BYTES,
                 progress: Progress | None = None):
        self.model, self.window, self.progress = model, window, progress
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        n = int(self.ids.shape[0])
        self.keep = (n - 1) * model.config.vocab_size * 4 <= cache_bytes
        self._pieces: list[tuple[int, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self._pieces is not None:
            yield from self._pieces
            return
        pieces: list[tuple[int, torch.Tensor]] = []
        for piece in logprob_chunks(self.model, self.ids, self.window, self.progress):
            if self.keep:
                pieces.append(piece)
            yield piece
        if self.keep:
            self._pieces = pieces


@dataclass
class TextScore:
    """Negative log-likelihood of one model over the scored targets."""

    tokens: int = 0
    nll_sum: float = 0.0

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))  # exp overflows past ~709: report a huge number, not an error

    def add(self, other: TextScore) -> None:
        self.tokens += other.tokens
        self.nll_sum += other.nll_sum


@dataclass
class PairScore:
    """KL(parent ‖ merged) of the next-token distributions and top-1 agreement, over the same targets."""

    tokens: int = 0
    kl_sum: float = 0.0
    agree: int = 0

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else math.nan

    @property
    def agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else math.nan

    def add(self, other: PairScore) -> None:
        self.tokens += other.tokens
        self.kl_sum += other.kl_sum
        self.agree += other.agree


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> float:
    return -float(logp.gather(1, targets[:, None]).double().sum())


def score(ids: list[int] | torch.Tensor, stream: Iterable[tuple[int, torch.Tensor]]) -> TextScore:
    """One model's NLL over targets 1..n-1 of `ids`, from its log-prob stream."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    out = TextScore()
    for first, logp in stream:
        targets = ids[first:first + logp.shape[0]].to(logp.device)
        out.tokens += logp.shape[0]
        out.nll_sum += _nll(logp, targets)
    return out


def score_pair(ids: list[int] | torch.Tensor, merged: Iterable[tuple[int, torch.Tensor]],
               parent: Iterable[tuple[int, torch.Tensor]]) -> tuple[TextScore, TextScore, PairScore]:
    """(merged's NLL, parent's NLL, their KL(parent ‖ merged) and agreement), the two streams in lockstep."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    m_score, p_score, pair = TextScore(), TextScore(), PairScore()
    m_iter, p_iter = iter(merged), iter(parent)
    for (m_first, m_logp), (p_first, p_logp) in zip(m_iter, p_iter, strict=True):
        if m_first != p_first or m_logp.shape != p_logp.shape:
            raise EvalError("the two models' scores do not line up (different vocabulary sizes?); compare "
                            "models that share a tokenizer and vocab_size")
        p_logp = p_logp.to(m_logp.device)
        targets = ids[m_first:m_first + m_logp.shape[0]].to(m_logp.device)
        t = m_logp.shape[0]
        m_score.tokens += t
        p_score.tokens += t
        pair.tokens += t
        m_score.nll_sum += _nll(m_logp, targets)
        p_score.nll_sum += _nll(p_logp, targets)
        # KL(p ‖ q) = Σ_v p_v (log p_v − log q_v); kl_div(input=log q, target=log p, log_target) computes it
        kl = F.kl_div(m_logp, p_logp, reduction="none", log_target=True).sum(-1)
        pair.kl_sum += float(kl.double().sum())
        pair.agree += int((m_logp.argmax(-1) == p_logp.argmax(-1)).sum())
    return m_score, p_score, pair


def token_logprobs(model, ids: list[int] | torch.Tensor, window: int) -> torch.Tensor:
    """log p(ids[t] | context) for t = 1..n-1 as one float32 tensor (what the windows score, in order)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    out = []
    for first, logp in logprob_chunks(model, ids, window):
        out.append(logp.gather(1, ids[first:first + logp.shape[0], None].to(logp.device))[:, 0].cpu())
    return torch.cat(out)
