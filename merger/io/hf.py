"""Hugging Face folder conventions: config.json edits and the tokenizer/generation files to carry over."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from merger.io.dtypes import dtype_name

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files that `src` has."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_config(dst: Path, config: dict[str, Any], dtype: torch.dtype | None = None, **updates: Any) -> None:
    """Write config.json with `updates` applied and the dtype fields set to `dtype`."""
    cfg = dict(config)
    cfg.update(updates)
    if dtype is not None:
        cfg["torch_dtype"] = dtype_name(dtype)
        if "dtype" in cfg:  # transformers >= 5 writes `dtype`; keep both in step
            cfg["dtype"] = dtype_name(dtype)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
