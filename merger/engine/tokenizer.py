"""Tokenizer for the engine: tokenizer.json via `tokenizers`, chat templates via jinja2, EOS ids from
config.json / generation_config.json / tokenizer_config.json, and UTF-8-safe streamed decoding.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from merger.engine.config import token_ids
from merger.errors import CheckpointError, MergerError


class ChatTemplateError(MergerError):
    """The model has no chat template, or its template failed to render."""


class TextError(MergerError):
    """Text to encode is not valid Unicode (e.g. an argv byte that was not UTF-8)."""


def check_text(text: str, what: str = "text") -> None:
    """TextError unless `text` is a str that encodes as UTF-8. Python turns an undecodable byte of argv into
    a lone surrogate (U+DC80 + byte); the message gives the byte back."""
    if not isinstance(text, str):
        raise TextError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise TextError(f"{what} is not valid UTF-8 ({byte} at character {e.start}); pass UTF-8 text "
                        "(check the terminal's or the file's encoding)") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model folder; CheckpointError if tokenizer.json is absent or unreadable."""
    from tokenizers import Tokenizer as _HFTokenizer

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise CheckpointError(f"{tj} is missing; copy the tokenizer files from the model's base "
                              "(tokenizer_source in a recipe)")
    try:
        tok = _HFTokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise CheckpointError(f"{tj}: cannot be read by the tokenizers library ({e})") from None
    tcfg = _read_json(path / "tokenizer_config.json")
    return Tokenizer(tok, tcfg, _read_json(path / "config.json"), _read_json(path / "generation_config.json"),
                     read_chat_template(path, tcfg))


class Tokenizer:
    def __init__(self, tok: Any, tokenizer_config: dict[str, Any], config: dict[str, Any],
                 generation_config: dict[str, Any], chat_template: str | None):
        self._tok = tok
        self.chat_template = chat_template
        self.special = {k: _token_str(tokenizer_config.get(k))
                        for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        # BOS comes from the tokenizer's own files only: config.json often names one (Qwen2) that the
        # tokenizer never adds
        self.bos_token_id: int | None = _token_id(tok, self.special["bos_token"])
        if tokenizer_config.get("add_bos_token") is False:
            self.bos_token_id = None  # the model was trained without BOS: adding one would hurt
        eos: set[int] = set()
        for name, cfg in (("generation_config.json", generation_config), ("config.json", config)):
            eos.update(token_ids(cfg.get("eos_token_id"), "eos_token_id", name))
        tid = _token_id(tok, self.special["eos_token"])
        if tid is not None:
            eos.add(tid)
        self.eos_token_ids: set[int] = eos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`: BOS (if asked and the tokenizer has one) + the text, no other specials."""
        check_text(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's jinja2 chat template."""
        if not self.chat_template:
            raise ChatTemplateError("the model has no chat template (tokenizer_config.json chat_template or "
                                    "chat_template.jinja); run without --chat")
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"chat template: {message}")

        # trim_blocks/lstrip_blocks: the whitespace rules chat templates are written against
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{k: v or "" for k, v in self.special.items()})
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Template + encode; BOS only if the rendered text does not already start with it."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        bos = self.special["bos_token"]
        return self.encode(text, add_bos=not (bos and text.startswith(bos)))


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a multi-byte character.

    Each step decodes from one token before the last emitted one (so tokenizers that strip a leading
    space still see context) and holds back text ending in U+FFFD, an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # decode window start
        self.read = 0     # tokens already turned into emitted text
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        piece = now[len(before):]
        self.emitted += piece
        return piece

    def flush(self) -> str:
        """Whatever the final decode holds beyond what was emitted (e.g. a truly invalid byte tail)."""
        full = self.tok.decode(self.ids)
        piece = full[len(self.emitted):] if full.startswith(self.emitted) else ""
        self.emitted += piece
        return piece


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def read_chat_template(path: Path, tcfg: dict[str, Any] | None = None) -> str | None:
    """A model folder's chat template, where transformers looks for it first: chat_template.jinja, then
    tokenizer_config.json's `chat_template`, then chat_template.json (named templates: the default)."""
    if tcfg is None:
        tcfg = _read_json(path / "tokenizer_config.json")
    if (path / "chat_template.jinja").is_file():  # transformers >= 4.50 writes it separately
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = tcfg.get("chat_template") or _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


def _token_id(tok: Any, token: str | None) -> int | None:
    return None if token is None else tok.token_to_id(token)
