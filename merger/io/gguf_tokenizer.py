"""Hugging Face tokenizer files from a GGUF file's `tokenizer.*` metadata, rebuilt with the `tokenizers`
library: byte-level BPE (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM, StarCoder, Llama 3, Qwen) or
SentencePiece (`"llama"`: Llama 2, Mistral, Gemma; see gguf_spm), plus tokenizer_config.json (special
tokens, chat template) and generation_config.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merger.errors import CheckpointError

from merger.io.gguf import CONTROL, NORMAL, UNKNOWN, USER_DEFINED

# How text is split before BPE, by `tokenizer.ggml.pre`. These are llama.cpp's pre-tokenizer families;
# a vocabulary must be split exactly as its merges were learned or encodings silently differ.
_GPT2 = ("default", "gpt2", "gpt-2", "")
_DIGITS = ("smollm", "starcoder", "refact")  # GPT-2 regex after splitting every digit on its own
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2/2.5/3 (and DeepSeek-R1's Qwen distills): Llama 3's split but every digit on its own
_QWEN2 = ("qwen2", "deepseek-r1-qwen")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE = _GPT2 + _DIGITS + _LLAMA3 + _QWEN2
MODELS = ("gpt2", "llama")  # tokenizer.ggml.model values rebuilt here


def check_tokenizer(md: dict[str, Any], path: Path) -> None:
    """Fail before any tensor is written when the tokenizer cannot be rebuilt faithfully."""
    model = md.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in md:
        raise CheckpointError(f"{path}: the GGUF file has no tokenizer; convert with --no-tokenizer and copy "
                              f"the tokenizer files from the original model")
    if model not in MODELS:
        raise CheckpointError(f"{path}: tokenizer type {model!r} is not supported (only byte-level BPE 'gpt2' and "
                              f"SentencePiece 'llama'); convert with --no-tokenizer and copy the tokenizer files "
                              f"from the original model")
    if model == "llama":
        return
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported (known: "
                              f"{', '.join(p for p in SUPPORTED_PRE if p)}); convert with --no-tokenizer and copy "
                              f"the tokenizer files from the original model")
    if "tokenizer.ggml.merges" not in md:
        raise CheckpointError(f"{path}: BPE tokenizer without merges; the GGUF file is incomplete")


def build_tokenizer(md: dict[str, Any]):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this vocabulary."""
    from tokenizers import AddedToken, processors

    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    spm = md.get("tokenizer.ggml.model") == "llama"
    if spm:
        from merger.io.gguf_spm import build_spm

        tok, special_types = build_spm(md), (CONTROL, UNKNOWN)
    else:
        tok, special_types = _byte_level(md, tokens), (CONTROL,)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in special_types])
    # a SentencePiece user-defined piece with a space is in the vocabulary (respelled with U+2581) instead
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                    if ty == USER_DEFINED and not (spm and " " in t)])
    bos, eos = md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id")
    bos_t = [tokens[bos]] if bos is not None and md.get("tokenizer.ggml.add_bos_token", spm) else []
    eos_t = [tokens[eos]] if eos is not None and md.get("tokenizer.ggml.add_eos_token", False) else []
    if bos_t or eos_t:
        ids = dict(([(tokens[bos], bos)] if bos_t else []) + ([(tokens[eos], eos)] if eos_t else []))
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(bos_t + ["$A"] + eos_t), pair=" ".join(bos_t + ["$A"] + eos_t + bos_t + ["$B"] + eos_t),
            special_tokens=list(ids.items()))
    elif not spm:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _byte_level(md: dict[str, Any], tokens: list[str]):
    """GPT-2-style BPE over bytes, split before merging the way `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated string keeps its first id, as llama.cpp's lookup does
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = md.get("tokenizer.ggml.pre", "default")
    split = {**dict.fromkeys(_LLAMA3, _LLAMA3_SPLIT), **dict.fromkeys(_QWEN2, _QWEN2_SPLIT)}.get(pre)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if pre in _DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    if pre in _QWEN2:  # Qwen's own tokenizer.json composes text first (NFC)
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
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


# Tokens llama.cpp also ends generation on when the file has them as control tokens (end of turn/text)
_EOG = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>")


def end_of_generation_ids(md: dict[str, Any]) -> list[int]:
    """EOS, then the end-of-turn ids llama.cpp stops on: eot/eom ids the file names, and _EOG tokens."""
    tokens, types = md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.token_type") or []
    ids = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ids += [i for i, t in enumerate(tokens) if t in _EOG and i < len(types) and types[i] == CONTROL]
    return list(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= i < len(tokens)))


def write_tokenizer_files(md: dict[str, Any], dst: Path, max_positions: int | None) -> list[str]:
    """tokenizer.json, tokenizer_config.json (+ chat template), generation_config.json into `dst`."""
    tokens = md["tokenizer.ggml.tokens"]
    build_tokenizer(md).save(str(dst / "tokenizer.json"))
    ids = special_token_ids(md)
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token",
                                                        md.get("tokenizer.ggml.model") == "llama")),
                           "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False))}
    cfg.update({f"{role}_token": tokens[i] for role, i in ids.items()})
    if max_positions:
        cfg["model_max_length"] = max_positions
    template = md.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen: dict[str, Any] = {f"{role}_token_id": i for role, i in ids.items() if role in ("bos", "pad")}
    eog = end_of_generation_ids(md)
    if eog:  # e.g. Gemma 3's [<eos>, <end_of_turn>], as its own generation_config.json says
        gen["eos_token_id"] = eog[0] if len(eog) == 1 else eog
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
