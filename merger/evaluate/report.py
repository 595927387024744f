"""`merger eval` as a library call: score models on texts (tokens, mean NLL, perplexity per domain) and,
against its parents, a merge's KL(parent ‖ merged) and top-1 agreement; the plain-text table, the JSON
and the small table `merger demo` ends with. At most two models are loaded at a time (the merge and one
parent); the merge's log-probs are kept between parents when they fit (score.CACHE_BYTES)."""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merger.errors import EvalError
from merger.evaluate.score import LogProbs, PairScore, TextScore, score, score_pair, stride_of
from merger.evaluate.texts import Text, builtin_texts, encode

DEFAULT_WINDOW = 1024


@dataclass
class DomainResult:
    domain: str
    tokens: int
    nll: float                      # mean negative log-likelihood, nats per token
    ppl: float                      # exp(nll)
    kl: float | None = None         # parents: mean KL(parent ‖ merged), nats per token
    agreement: float | None = None  # parents: fraction of positions where both pick the same top-1 token


@dataclass
class ModelResult:
    model: str
    role: str                       # "merged", "parent" (with --against) or "model"
    window: int
    stride: int
    domains: list[DomainResult] = field(default_factory=list)
    total: DomainResult | None = None   # every domain together (token-weighted), when there are several


@dataclass
class EvalReport:
    models: list[ModelResult]
    dtype: str | None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self, names: dict[str, str] | None = None) -> str:
        return format_table(self, names)


class ProgressLine:
    """`scoring MODEL on DOMAIN: done/total tokens, tokens/s` on stderr when it is a terminal, redrawn in
    place; only for a text that takes over DELAY seconds, and erased when it is done (the table follows)."""

    DELAY = 0.5

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.label, self.t0, self.last, self.shown = "", 0.0, 0.0, False

    def start(self, label: str) -> ProgressLine:
        self.label, self.t0, self.last, self.shown = label, time.perf_counter(), 0.0, False
        return self

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done >= total:
            if self.shown:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            return
        if now - self.t0 < self.DELAY or now - self.last < 0.2:
            return
        self.last, self.shown = now, True
        rate = done / max(now - self.t0, 1e-9)
        print(f"\r\033[K{self.label}: {done}/{total} tokens, {rate:.0f} tokens/s", end="", file=sys.stderr, flush=True)


def same_vocabulary(merged: Path, parent: Path) -> None:
    """EvalError unless both models have the same vocab_size and the same token -> id map (KL and agreement
    compare distributions id by id). Read from config.json and tokenizer.json, before any weights load."""
    from tokenizers import Tokenizer as _HFTokenizer

    from merger.engine.config import load_model_config

    sizes = [load_model_config(p)[1].vocab_size for p in (merged, parent)]
    if sizes[0] != sizes[1]:
        raise EvalError(f"--against: {parent} has vocab_size {sizes[1]} but {merged} has {sizes[0]}; KL and "
                        "agreement compare the same token ids, so compare models that share a vocabulary")
    vocabs = []
    for p in (merged, parent):
        tj = p / "tokenizer.json"
        if not tj.is_file():
            raise EvalError(f"{tj} is missing; a model folder needs its tokenizer files to be scored")
        vocabs.append(_HFTokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True))
    if vocabs[0] != vocabs[1]:
        diff = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()), key=lambda kv: kv[1])[0]
        raise EvalError(f"--against: {parent} and {merged} have different tokenizers (token {diff[0]!r} is id "
                        f"{vocabs[1].get(diff[0])} in one and {vocabs[0].get(diff[0])} in the other); KL and "
                        "agreement compare the same token ids, so compare models that share a tokenizer")


def model_window(path: Path, window: int) -> int:
    from merger.engine.config import load_model_config

    if window < 2:
        raise EvalError(f"--window {window}: a window needs at least 2 tokens (one to condition on, one to score)")
    return min(window, load_model_config(path)[1].max_position_embeddings)


def _result(domain: str, s: TextScore, pair: PairScore | None = None) -> DomainResult:
    return DomainResult(domain, s.tokens, s.nll, s.ppl, None if pair is None else pair.kl,
                        None if pair is None else pair.agreement)


def _with_total(r: ModelResult, scores: list[TextScore], pairs: list[PairScore] | None) -> ModelResult:
    if len(scores) > 1:
        total, tpair = TextScore(), PairScore() if pairs else None
        for s in scores:
            total.add(s)
        for p in pairs or []:
            tpair.add(p)
        r.total = _result("(all)", total, tpair)
    return r


def evaluate(models: Sequence[str | Path], texts: Sequence[Text] | None = None, against: bool = False,
             dtype: torch.dtype | None = None, device: str = "cpu", window: int = DEFAULT_WINDOW,
             progress: bool | None = None) -> EvalReport:
    """Score each model on each text. With `against`, models[0] is a merge and the others its parents:
    they share its token ids and windows, and each parent's rows add KL(parent ‖ merged) and agreement."""
    from merger.engine.model import load_model
    from merger.engine.tokenizer import load_tokenizer

    paths = [Path(m) for m in models]
    if not paths:
        raise EvalError("give a model folder to score")
    for p in paths:
        if not (p / "config.json").is_file():
            raise EvalError(f"{p}: not a model folder (no config.json); give the folder `merger build` wrote")
    if against and len(paths) < 2:
        raise EvalError("--against compares the first model with the ones after it; give its parents too "
                        "(merger eval ./merged --against ./base ./ft-a)")
    texts = list(texts) if texts else builtin_texts()
    bar = ProgressLine(progress)
    t0 = time.perf_counter()
    results: list[ModelResult] = []
    if not against:
        for p in paths:
            w = model_window(p, window)
            model, tok = load_model(p, dtype, device), load_tokenizer(p)
            scores = []
            for text in texts:
                ids = encode(tok, text, model.config.vocab_size, str(p))
                stream = LogProbs(model, ids, w, cache_bytes=0, progress=bar.start(f"scoring {p} on {text.name}"))
                scores.append(score(ids, stream))
            results.append(_with_total(ModelResult(str(p), "model", w, stride_of(w),
                                                   [_result(t.name, s) for t, s in zip(texts, scores)]), scores, None))
            del model
        return EvalReport(results, None if dtype is None else str(dtype).removeprefix("torch."),
                          time.perf_counter() - t0)

    merged_path, parents = paths[0], paths[1:]
    for p in parents:
        same_vocabulary(merged_path, p)
    w = min(model_window(p, window) for p in paths)  # one window for all: the streams must line up
    merged, tok = load_model(merged_path, dtype, device), load_tokenizer(merged_path)
    ids_per_text = [encode(tok, t, merged.config.vocab_size, str(merged_path)) for t in texts]
    streams = [LogProbs(merged, ids, w) for ids in ids_per_text]
    merged_scores: list[TextScore] = []
    for p in parents:
        model = load_model(p, dtype, device)
        scores, pairs = [], []
        for text, ids, m_stream in zip(texts, ids_per_text, streams):
            p_stream = LogProbs(model, ids, w, cache_bytes=0,
                                progress=bar.start(f"scoring {merged_path} against {p} on {text.name}"))
            m, s, pair = score_pair(ids, m_stream, p_stream)
            scores.append(s)
            pairs.append(pair)
            if len(merged_scores) < len(texts):
                merged_scores.append(m)
        results.append(_with_total(ModelResult(str(p), "parent", w, stride_of(w),
                                               [_result(t.name, s, pr) for t, s, pr in zip(texts, scores, pairs)]),
                                   scores, pairs))
        del model
    head = ModelResult(str(merged_path), "merged", w, stride_of(w),
                       [_result(t.name, s) for t, s in zip(texts, merged_scores)])
    return EvalReport([_with_total(head, merged_scores, None), *results],
                      None if dtype is None else str(dtype).removeprefix("torch."), time.perf_counter() - t0)


def _num(v: float | None, digits: int) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.3g}"


def format_table(report: EvalReport, names: dict[str, str] | None = None) -> str:
    """A plain-text table: one row per model and domain (and a `(all)` row per model with several domains).
    `names` shortens model paths for display."""
    names = names or {}
    compared = any(m.role == "parent" for m in report.models)
    head = ["model", "domain", "tokens", "nll", "ppl"] + (["kl(parent‖merged)", "top-1 agree"] if compared else [])
    rows = []
    for m in report.models:
        label = names.get(m.model, m.model) + (f" ({m.role})" if m.role != "model" else "")
        for d in m.domains + ([m.total] if m.total else []):
            row = [label, d.domain, str(d.tokens), _num(d.nll, 4), _num(d.ppl, 2)]
            if compared:
                row += [_num(d.kl, 4), _num(d.agreement, 3)]
            rows.append(row)
            label = ""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    ws = sorted({(m.window, m.stride) for m in report.models})
    foot = "; ".join(f"window {w}, stride {s}" for w, s in ws)
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), f"({foot} tokens)"])


def format_wide(report: EvalReport, names: dict[str, str] | None = None) -> str:
    """One row per model, one perplexity column per domain (and `(all)`): the compact form `merger demo` prints."""
    names = names or {}
    domains = [d.domain for d in report.models[0].domains] + (["(all)"] if report.models[0].total else [])
    head = ["model", *(f"ppl {d}" for d in domains)]
    rows = [[names.get(m.model, m.model), *(_num(d.ppl, 2) for d in m.domains + ([m.total] if m.total else []))]
            for m in report.models]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def demo_table(root: str | Path, outputs: Sequence[str | Path], max_chars: int = 2000,
               progress: bool | None = False) -> str:
    """For `merger demo`: the demo's inputs (root/models/*) and the merges it built, scored on the first
    `max_chars` characters of each built-in domain (window 256), perplexity per domain, one row per model
    (names relative to root)."""
    root = Path(root)
    inputs = sorted(p for p in (root / "models").iterdir() if (p / "config.json").is_file()) \
        if (root / "models").is_dir() else []
    models = list(dict.fromkeys([*inputs, *(Path(o) for o in outputs)]))
    texts = [Text(t.name, t.text[:max_chars], t.source) for t in builtin_texts()]
    report = evaluate(models, texts, window=256, progress=progress)
    names = {}
    for p in models:
        try:
            names[str(p)] = str(p.relative_to(root))
        except ValueError:
            names[str(p)] = str(p)
    foot = (f"(perplexity on the first {max_chars} characters of each built-in text; random tiny models score "
            f"near the vocabulary size: `merger eval MODEL --against PARENTS` compares a merge with its inputs)")
    return format_wide(report, names) + "\n" + foot
