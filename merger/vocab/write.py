"""The output's tokenizer files: the source model's, copied; when the vocabulary changed, tokenizer.json
rewritten (new regular tokens join the model's vocabulary at their new ids, new added/special tokens
join `added_tokens`, tokens past the source's vocab_size leave) with tokenizer_config.json's
`added_tokens_decoder` (and a legacy added_tokens.json) kept in step; and the chosen chat template
written to tokenizer_config.json and chat_template.jinja (a stale chat_template.json removed)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.errors import CheckpointError
from merger.io.hf import copy_tokenizer
from merger.vocab.output import OutputVocab
from merger.vocab.read import load_tokenizer_json, read_json_or_empty

_RECORD_KEYS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass
class TokenizerFiles:
    """What to write for the output's tokenizer: the files of `source`, edited for `vocab` (None: as
    they are) and carrying `chat_template` (None: the source's own)."""

    source: Path
    vocab: OutputVocab | None = None
    chat_template: str | None = None

    def write(self, dst: Path) -> list[str]:
        copied = copy_tokenizer(self.source, dst)
        if self.vocab is not None and self.vocab.rewrites_tokenizer:
            rewrite_vocabulary(self.vocab, dst)
        if self.chat_template is not None:
            set_chat_template(dst, self.chat_template)
        return copied


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def rewrite_vocabulary(vocab: OutputVocab, dst: Path) -> None:
    data = load_tokenizer_json(dst, vocab.source.ref)
    model = data["model"]
    dropped = set(vocab.dropped)
    if dropped:
        _drop(model, dropped, dst / "tokenizer.json")
        data["added_tokens"] = [r for r in data.get("added_tokens") or [] if r["content"] not in dropped]
    for t in vocab.new:
        j = vocab.tokens[t.token]
        if t.record is not None:
            data.setdefault("added_tokens", []).append({"id": j, **{k: t.record.get(k, False) for k in _RECORD_KEYS}})
        elif isinstance(model.get("vocab"), dict):
            model["vocab"][t.token] = j
        else:  # Unigram: pieces are listed in id order; a new piece gets the lowest score
            pieces = model["vocab"]
            if j != len(pieces):
                raise CheckpointError(f"{dst / 'tokenizer.json'}: cannot place token {t.token!r} at id {j} of a "
                                      f"Unigram vocabulary of {len(pieces)} pieces")
            pieces.append([t.token, min((p[1] for p in pieces), default=0.0) - 1.0])
    text = json.dumps(data, ensure_ascii=False)
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library rejects what it cannot load, with its own exception
        raise CheckpointError(f"the union tokenizer built from {vocab.source.ref!r} does not load ({e}); "
                              f"use tokenizer_source: base or a model reference") from None
    (dst / "tokenizer.json").write_text(text, encoding="utf-8")
    _sync_tokenizer_config(vocab, dst, dropped)


def _drop(model: dict[str, Any], dropped: set[str], path: Path) -> None:
    """Remove tokens (past the embedding rows) from a BPE model: its vocabulary and the merges using them."""
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: {len(dropped)} tokens have ids past config.json's vocab_size, and only "
                              f"a BPE tokenizer can be trimmed; fix vocab_size or the tokenizer")
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in dropped}

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in dropped for p in parts) and "".join(parts) not in dropped

    model["merges"] = [m for m in model.get("merges") or [] if keep(m)]


def _sync_tokenizer_config(vocab: OutputVocab, dst: Path, dropped: set[str]) -> None:
    cfg_path = dst / "tokenizer_config.json"
    cfg = read_json_or_empty(cfg_path)
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items()
                                       if not (isinstance(v, dict) and v.get("content") in dropped)}
        for t in vocab.new:
            if t.record is not None:
                cfg["added_tokens_decoder"][str(vocab.tokens[t.token])] = {k: t.record.get(k, False)
                                                                           for k in _RECORD_KEYS}
        _dump(cfg_path, cfg)
    legacy = dst / "added_tokens.json"
    if legacy.exists():
        added = {k: v for k, v in read_json_or_empty(legacy).items() if k not in dropped}
        added.update({t.token: vocab.tokens[t.token] for t in vocab.new if t.record is not None})
        _dump(legacy, added)


def set_chat_template(dst: Path, template: str) -> None:
    cfg_path = dst / "tokenizer_config.json"
    cfg = read_json_or_empty(cfg_path)
    cfg["chat_template"] = template
    _dump(cfg_path, cfg)
    (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
    (dst / "chat_template.json").unlink(missing_ok=True)  # an older template there would win in transformers
