"""The output vocabulary: a model's own (`tokenizer_source: base` or a model reference), or the
union (`union`: the base's, else the first model's, then every regular token the other inputs have
that it lacks, in input order, then their added/special tokens, first definition wins), plus the
tokens a recipe's `tokenizer.tokens` names; padded to `pad_to_multiple_of` rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merger.vocab.read import Vocab


@dataclass
class NewToken:
    token: str
    origin: str                          # the model it comes from, or "tokenizer.tokens"
    record: dict[str, Any] | None        # an added/special token's record; None: a regular vocabulary token


@dataclass
class OutputVocab:
    mode: str                            # "union", or the reference whose tokenizer is the output's
    source: Vocab                        # the tokenizer whose files the output starts from
    tokens: dict[str, int]               # output token -> id
    size: int                            # highest id + 1
    rows: int                            # embedding rows: size, padded
    new: list[NewToken] = field(default_factory=list)

    @property
    def dropped(self) -> list[str]:
        return self.source.dropped

    @property
    def rewrites_tokenizer(self) -> bool:
        """True when the source's tokenizer files no longer describe the output vocabulary."""
        return bool(self.new or self.dropped)

    def describe(self) -> str:
        """One line for `merger validate` and the card: where the vocabulary comes from and what was added."""
        what = "union of the inputs' vocabularies" if self.mode == "union" else f"the vocabulary of {self.mode!r}"
        parts = [f"{what}: {self.size} tokens from {self.source.ref!r}'s tokenizer"]
        if self.new:
            shown = ", ".join(f"{t.token!r} from {t.origin!r}" for t in self.new[:6])
            more = f" and {len(self.new) - 6} more" if len(self.new) > 6 else ""
            parts.append(f"{len(self.new)} added ({shown}{more})")
        if self.dropped:
            parts.append(f"{len(self.dropped)} of the source's tokens past its vocab_size left out")
        if self.rows != self.size:
            parts.append(f"padded to {self.rows} rows")
        return "; ".join(parts)


def pad_rows(size: int, multiple: int | None) -> int:
    return size if not multiple else -(-size // multiple) * multiple


def extra_record(token: str) -> dict[str, Any]:
    """The added-token record for a token a recipe names (a plain, non-special added token)."""
    return {"content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "special": False}


def output_vocab(mode: str, first: Vocab, vocabs: list[Vocab], extra_tokens: list[str],
                 pad_to_multiple_of: int | None) -> OutputVocab:
    """`mode` "union" (starting from `first`, the base or the first model, then `vocabs` in order) or a
    model's reference (`first` is then that model's vocabulary)."""
    tokens = dict(first.ids)
    new: list[NewToken] = []
    next_id = max(tokens.values(), default=-1) + 1

    def add(token: str, origin: str, record: dict[str, Any] | None) -> None:
        nonlocal next_id
        tokens[token] = next_id
        new.append(NewToken(token, origin, None if record is None else {**record, "id": next_id}))
        next_id += 1

    if mode == "union":
        for v in vocabs:
            for tok, _ in sorted(v.ids.items(), key=lambda kv: kv[1]):
                if tok not in tokens and tok not in v.added:
                    add(tok, v.ref, None)
        for v in vocabs:
            for tok, rec in sorted(v.added.items(), key=lambda kv: kv[1]["id"]):
                if tok not in tokens:
                    add(tok, v.ref, {k: x for k, x in rec.items() if k != "id"})
    for tok in extra_tokens:
        if tok not in tokens:
            add(tok, "tokenizer.tokens", extra_record(tok))
    size = max(tokens.values(), default=-1) + 1
    return OutputVocab(mode, first, tokens, size, pad_rows(size, pad_to_multiple_of), new)
