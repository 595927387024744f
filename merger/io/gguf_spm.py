"""SentencePiece vocabularies stored in GGUF (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral v0.1,
TinyLlama, Gemma) as a `tokenizers` BPE with byte fallback. A GGUF keeps the pieces, their scores and
types but no merges; llama.cpp's tokenizer merges, at each step, the adjacent pair whose union is the
highest-scoring piece, which is what BPE does with one merge per way of cutting a piece in two, ranked
by that piece's score. Special and user-defined tokens are added by gguf_tokenizer.
"""
from __future__ import annotations

from typing import Any

from merger.io.gguf import BYTE, NORMAL, UNUSED, USER_DEFINED

SPACE = "\u2581"  # SentencePiece's visible space


def spm_pieces(md: dict[str, Any]) -> list[str]:
    """The pieces as the vocabulary spells them. llama.cpp's converter writes the U+2581 of user-defined
    pieces as plain spaces ("  " for a two-space token); put them back so merges and text agree."""
    types = md.get("tokenizer.ggml.token_type") or []
    return [t.replace(" ", SPACE) if i < len(types) and types[i] == USER_DEFINED else t
            for i, t in enumerate(md["tokenizer.ggml.tokens"])]


def spm_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) cut of a piece into two pieces, ranked best first. User-defined pieces come
    first (llama.cpp matches them whole before merging anything), then by score, ties by id. Control
    and byte pieces are never produced by merging."""
    ids: dict[str, int] = {}
    for i, p in enumerate(pieces):
        ids.setdefault(p, i)
    ranked = []
    for i, p in enumerate(pieces):
        ty = types[i]
        if ty not in (NORMAL, USER_DEFINED, UNUSED) or ids[p] != i or len(p) < 2:
            continue
        key = (0, 0.0, i) if ty == USER_DEFINED else (1, -scores[i], i)
        ranked += [(key, k, p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in ids and p[k:] in ids]
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(left, right) for _, _, left, right in ranked]


def build_spm(md: dict[str, Any]):
    """The BPE model, normalizer and decoder of a SentencePiece vocabulary (no added tokens yet).

    Spaces become U+2581 and, when `tokenizer.ggml.add_space_prefix` is true (the default; Gemma writes
    false), each stretch of text between special tokens gets one in front, as llama.cpp does."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = spm_pieces(md)
    n = len(pieces)
    types = list(md.get("tokenizer.ggml.token_type") or [NORMAL] * n)
    scores = list(md.get("tokenizer.ggml.scores") or [-float(i) for i in range(n)])
    vocab: dict[str, int] = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    unk = md.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(pieces, scores, types), fuse_unk=True,
                               byte_fallback=any(t == BYTE for t in types),
                               unk_token=pieces[unk] if unk is not None and 0 <= unk < n else None))
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
