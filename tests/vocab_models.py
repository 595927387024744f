"""Tiny checkpoints whose tokenizers differ from the synth base's, built from a model folder: tokens
added (special or regular), ids permuted (rows moved with them, so the model computes the same
function), padding rows past the tokenizer, or tokens past config.json's vocab_size."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SPECIAL_IDS = 3  # <unk>, <s>, </s> keep their ids: the post-processor names <s> by id
ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def variant(src: Path, dst: Path, *, added: tuple[str, ...] = (), regular: tuple[str, ...] = (),
            permute: int | None = None, pad_rows: int = 0, past_rows: int = 0, seed: int = 0) -> Path:
    """A copy of model `src` at `dst` with its vocabulary edited. `added`: special tokens appended;
    `regular`: plain vocabulary tokens appended; `permute`: a seed for shuffling every id past the
    specials; `pad_rows`: embedding rows past the tokenizer (random, so carrying them would show);
    `past_rows`: that many of the appended tokens get ids at or past config.json's vocab_size."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    w = load_file(str(dst / "model.safetensors"))
    n = cfg["vocab_size"]
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.arange(n)
    if permute is not None:
        rest = torch.randperm(n - SPECIAL_IDS, generator=torch.Generator().manual_seed(permute)) + SPECIAL_IDS
        perm[SPECIAL_IDS:] = rest
    vocab = tj["model"]["vocab"]
    tj["model"]["vocab"] = {t: int(perm[i]) for t, i in vocab.items()}
    for r in tj["added_tokens"]:
        r["id"] = int(perm[r["id"]])
    next_id = n
    for t in regular:
        tj["model"]["vocab"][t] = next_id
        next_id += 1
    for t in added:
        tj["added_tokens"].append({"id": next_id, "content": t, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
        next_id += 1
    rows = next_id - past_rows + pad_rows
    for name in ROWS:
        if name not in w:
            continue
        old = w[name]
        new = torch.randn((rows, old.shape[1]), generator=g, dtype=torch.float32).to(old.dtype) * old.float().std()
        new[perm] = old
        w[name] = new
    cfg["vocab_size"] = rows
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def token_ids(folder: Path) -> dict[str, int]:
    tj = json.loads((folder / "tokenizer.json").read_text())
    ids = dict(tj["model"]["vocab"])
    ids.update({r["content"]: r["id"] for r in tj["added_tokens"]})
    return ids
