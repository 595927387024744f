"""One model's vocabulary as a merge sees it, read from tokenizer.json without the tokenizers
library: token string -> id (model vocabulary and added tokens), the added-token records, and the
embedding rows config.json declares. Tokens whose id is at or past those rows cannot have an
embedding: they are left out (and counted, for the warning)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.errors import CheckpointError
from merger.io.checkpoint import read_json
from merger.io.safetensors_file import regular_file
from merger.io.hf import config_int

MAX_TOKENIZER_BYTES = 256 * 1024 * 1024


@dataclass
class Vocab:
    ref: str
    folder: Path
    ids: dict[str, int]                     # token -> id, only ids < rows
    added: dict[str, dict[str, Any]]        # added/special token -> its tokenizer.json record (id < rows)
    rows: int                               # config.json vocab_size: embedding rows
    length: int                             # tokens the tokenizer has (before dropping)
    dropped: list[str] = field(default_factory=list)  # tokens with an id >= rows
    kind: str = "BPE"                       # the tokenizer.json model type

    def same_as(self, other: Vocab) -> bool:
        return self.ids == other.ids and self.rows == other.rows

    def first_difference(self, other: Vocab) -> str | None:
        """The first token (by this vocabulary's ids) that the other lacks or has at another id."""
        for tok, i in sorted(self.ids.items(), key=lambda kv: kv[1]):
            if other.ids.get(tok) != i:
                return tok
        extra = sorted(set(other.ids) - set(self.ids), key=lambda t: other.ids[t])
        return extra[0] if extra else None


def load_tokenizer_json(folder: Path, ref: str) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"model {ref!r}: {path} is missing; aligning vocabularies needs each input's "
                              f"tokenizer.json (a fast tokenizer)")
    if not regular_file(path) or path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(f"{path}: not a regular file of at most {MAX_TOKENIZER_BYTES // 2**20} MiB")
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a tokenizer") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e}); re-download the tokenizer") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: not a tokenizers file (no `model` object)")
    return data


def model_vocab(data: dict[str, Any], path: Path) -> tuple[str, dict[str, int]]:
    """(model type, token -> id) of tokenizer.json's model section."""
    model = data["model"]
    kind = model.get("type") or ("Unigram" if isinstance(model.get("vocab"), list) else "BPE")
    vocab = model.get("vocab")
    if isinstance(vocab, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                       for k, v in vocab.items()):
        return kind, dict(vocab)
    if isinstance(vocab, list) and all(isinstance(e, list) and e and isinstance(e[0], str) for e in vocab):
        return kind, {e[0]: i for i, e in enumerate(vocab)}
    raise CheckpointError(f"{path}: model.vocab is neither a token -> id mapping nor a Unigram piece list")


def added_records(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    records = data.get("added_tokens") or []
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("content"), str) and isinstance(r.get("id"), int)
            for r in records):
        raise CheckpointError(f"{path}: added_tokens is not a list of {{id, content, ...}} records")
    return records


def read_vocab(ref: str, folder: Path, config: dict[str, Any]) -> Vocab:
    """The vocabulary of model `ref` (its folder and config.json)."""
    path = folder / "tokenizer.json"
    data = load_tokenizer_json(folder, ref)
    kind, ids = model_vocab(data, path)
    records = added_records(data, path)
    for r in records:
        ids.setdefault(r["content"], r["id"])
    rows = config_int(config, "vocab_size", folder / "config.json", minimum=1)
    dropped = sorted((t for t, i in ids.items() if i >= rows), key=lambda t: ids[t])
    kept = {t: i for t, i in ids.items() if i < rows}
    added = {r["content"]: r for r in records if r["id"] < rows}
    return Vocab(ref, folder, kept, added, rows, len(ids), dropped, kind)


def read_json_or_empty(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = read_json(path, path.name)
    return data if isinstance(data, dict) else {}
