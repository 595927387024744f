"""Hugging Face folder conventions: config.json edits and the tokenizer/generation files to carry over."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from merger.errors import CheckpointError
from merger.io.safetensors_file import regular_file
from merger.io.dtypes import dtype_name, parse_dtype

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files that `src` has (regular files only)."""
    copied = []
    for name in TOKENIZER_FILES:
        if regular_file(src / name):
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def output_config(config: dict[str, Any], dtype: torch.dtype | None = None, **updates: Any) -> dict[str, Any]:
    """A copy of `config` with `updates` applied and the dtype fields set to `dtype`."""
    cfg = dict(config)
    cfg.update(updates)
    if dtype is not None:
        cfg["torch_dtype"] = dtype_name(dtype)
        if "dtype" in cfg:  # transformers >= 5 writes `dtype`; keep both in step
            cfg["dtype"] = dtype_name(dtype)
    return cfg


def write_config(dst: Path, config: dict[str, Any], dtype: torch.dtype | None = None, **updates: Any) -> None:
    """Write config.json with `updates` applied and the dtype fields set to `dtype`."""
    cfg = output_config(config, dtype, **updates)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def config_dtype(cfg: dict[str, Any]) -> torch.dtype | None:
    """The dtype config.json declares (`torch_dtype`, or transformers 5's `dtype`), None if absent or unknown."""
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    try:
        return parse_dtype(name) if isinstance(name, str) else None
    except ValueError:
        return None


def config_int(cfg: dict[str, Any], key: str, where: str | Path, default: int | None = None, minimum: int = 0) -> int:
    """An integer field of config.json (not a boolean, at least `minimum`); CheckpointError names it."""
    value = cfg.get(key, default)
    if value is None and default is None:
        raise CheckpointError(f"{where}: {key} is missing; add it to config.json")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{where}: {key} {value!r} is not an integer >= {minimum}; fix config.json")
    return value
