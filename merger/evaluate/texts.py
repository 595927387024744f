"""The texts an evaluation scores: the built-in domains shipped in data/ (written for merger, Apache-2.0
like the code; data/SOURCES.md) and users' own files (`--text`), each a named `Text`, plus encoding one
into token ids for a model (BOS + text, as the engine encodes a prompt)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from merger.errors import EvalError
from merger.io.files import read_user_text

# name -> (file in data/, what it holds); the order is the table's
DOMAINS: dict[str, tuple[str, str]] = {
    "prose": ("prose.txt", "short fiction and a short essay in plain English"),
    "code": ("code.txt", "Python: small functions, a class, a parser, tests"),
    "qa": ("qa.txt", "question/answer pairs on science, history, geography and everyday facts"),
    "math": ("math.txt", "worked arithmetic, algebra, geometry, probability and calculus"),
}
MAX_TEXT_BYTES = 512 * 2**20  # a held-out text is megabytes at most; this stops a wrong file early


@dataclass(frozen=True)
class Text:
    name: str      # the domain label in tables and JSON
    text: str
    source: str    # "built-in" or the file it came from


def builtin_texts(names: list[str] | None = None) -> list[Text]:
    """The built-in domains (all, or those named, in the order given)."""
    names = list(DOMAINS) if not names else names
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise EvalError(f"unknown built-in text {unknown[0]!r}; built-in: {', '.join(DOMAINS)}")
    data = resources.files("merger.evaluate") / "data"
    return [Text(n, (data / DOMAINS[n][0]).read_text(encoding="utf-8"), "built-in") for n in names]


def read_text_file(path: str | Path) -> Text:
    """A user's text file as a Text named after the file (its stem); one-line EvalErrors otherwise."""
    p = Path(path)
    text = read_user_text(p, "text", MAX_TEXT_BYTES, EvalError)
    if not text.strip():
        raise EvalError(f"{path}: the text is empty; give a file with at least a sentence of text")
    return Text(p.stem or str(p), text, str(path))


def unique_names(texts: list[Text]) -> list[Text]:
    """Texts whose names clash (two notes.txt in different folders) are labelled by their path instead."""
    counts: dict[str, int] = {}
    for t in texts:
        counts[t.name] = counts.get(t.name, 0) + 1
    return [Text(t.source, t.text, t.source) if counts[t.name] > 1 else t for t in texts]


def encode(tokenizer, text: Text, vocab_size: int, model: str) -> list[int]:
    """Token ids of `text` for a model: BOS (when its tokenizer adds one) + the text. At least two ids are
    needed (one to condition on, one to score); every id must have a row in the model's vocabulary."""
    if not text.text.strip():
        raise EvalError(f"text {text.name!r} is empty; give some text to score")
    ids = tokenizer.encode(text.text)
    if len(ids) < 2:
        raise EvalError(f"text {text.name!r} is {len(ids)} token(s) for {model}'s tokenizer; scoring needs "
                        "at least two (one to condition on, one to predict): give a longer text")
    top = max(ids)
    if top >= vocab_size:
        raise EvalError(f"text {text.name!r} encodes to token id {top} but {model} has vocab_size {vocab_size} "
                        "(config.json); its tokenizer does not belong to its weights")
    return ids
