"""Hugging Face tokenizer files from a GGUF file's `tokenizer.*` metadata: a byte-level BPE
(`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM, StarCoder, Llama 3) rebuilt with the `tokenizers`
library, plus tokenizer_config.json (special tokens, chat template) and generation_config.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merger.errors import CheckpointError

# llama.cpp's token types (llama_token_type): 3 = control (special), 4 = user-defined (added, not special).
CONTROL, USER_DEFINED = 3, 4

# How text is split before BPE, by `tokenizer.ggml.pre`. These are llama.cpp's pre-tokenizer families;
# a vocabulary must be split exactly as its merges were learned or encodings silently differ.
_GPT2 = ("default", "gpt2", "gpt-2", "")
_DIGITS = ("smollm", "starcoder", "refact")  # GPT-2 regex after splitting every digit on its own
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE = _GPT2 + _DIGITS + _LLAMA3


def check_tokenizer(md: dict[str, Any], path: Path) -> None:
    """Fail before any tensor is written when the tokenizer cannot be rebuilt faithfully."""
    model = md.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in md:
        raise CheckpointError(f"{path}: the GGUF file has no tokenizer; convert with --no-tokenizer and copy "
                              f"the tokenizer files from the original model")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer type {model!r} is not supported (only byte-level BPE, 'gpt2'); "
                              f"convert with --no-tokenizer and copy the tokenizer files from the original model")
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported (known: "
                              f"{', '.join(p for p in SUPPORTED_PRE if p)}); convert with --no-tokenizer and copy "
                              f"the tokenizer files from the original model")
    if "tokenizer.ggml.merges" not in md:
        raise CheckpointError(f"{path}: BPE tokenizer without merges; the GGUF file is incomplete")


def build_tokenizer(md: dict[str, Any]):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id, as llama.cpp's lookup does
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = md.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _LLAMA3)
    if pre in _DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    bos = md.get("tokenizer.ggml.bos_token_id")
    if md.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def special_token_ids(md: dict[str, Any]) -> dict[str, int]:
    """bos/eos/unk/pad token ids the file names (config.json and generation_config.json use them)."""
    out = {}
    for role in ("bos", "eos", "unk", "pad"):
        key = "padding" if role == "pad" else ("unknown" if role == "unk" else role)
        value = md.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and 0 <= value < len(md["tokenizer.ggml.tokens"]):
            out[role] = int(value)
    return out


def write_tokenizer_files(md: dict[str, Any], dst: Path, max_positions: int | None) -> list[str]:
    """tokenizer.json, tokenizer_config.json (+ chat template), generation_config.json into `dst`."""
    tokens = md["tokenizer.ggml.tokens"]
    build_tokenizer(md).save(str(dst / "tokenizer.json"))
    ids = special_token_ids(md)
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
                           "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False))}
    cfg.update({f"{role}_token": tokens[i] for role, i in ids.items()})
    if max_positions:
        cfg["model_max_length"] = max_positions
    template = md.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {f"{role}_token_id": i for role, i in ids.items() if role in ("bos", "eos", "pad")}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
