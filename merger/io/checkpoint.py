"""Lazy reader for a Hugging Face-format folder: config.json + model.safetensors or a sharded index.

Tensors are read one at a time through safetensors' mmap; nothing is loaded until asked for.
Tied embeddings (`tie_word_embeddings` and no `lm_head.weight`) expose lm_head as the embedding.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from merger.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
# Pickled trainer state that sits beside weights in many repos and is never a model.
_NOT_WEIGHTS = re.compile(r"(training_args|optimizer|scheduler|scaler|rng_state.*|trainer_state)\.(bin|pt|pth)")
_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a .safetensors header without touching tensor data; CheckpointError if it is corrupt."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            size = path.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= size - 8 - n:
                raise ValueError(f"tensor {name!r} points outside the file")
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
        return header
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); re-download or re-save the checkpoint"
        ) from None


class Checkpoint:
    """One model folder. `names` keeps the on-disk order; `get(name)` reads a single tensor."""

    def __init__(self, path: str | Path, label: str | None = None, allow_pickle: bool = False):
        self.path = Path(path)
        self.label = label or str(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model {self.label!r}: folder {self.path} does not exist")
        self.config = load_config(self.path, self.label)
        self._file_of: dict[str, str] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self._handles: dict[str, Any] = {}
        self._data_start: dict[str, int] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e}); re-save the checkpoint") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).is_file():
            files, weight_map = [SINGLE_NAME], None
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            pickles = sorted(p.name for p in self.path.iterdir() if is_pickle_weights(p.name))
            if not found and pickles and allow_pickle:
                files, weight_map = [], None
                self._load_pickles(pickles)
            elif not found:
                hint = (f" (found pickle weights {', '.join(pickles)}: convert them to safetensors, or pass "
                        f"--allow-pickle to load them with torch.load(weights_only=True))" if pickles else "")
                raise CheckpointError(f"model {self.label!r}: no *.safetensors weights in {self.path}{hint}")
            else:
                files, weight_map = found, None
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"model {self.label!r}: shard {fname} named in the index is missing")
            for name, info in read_safetensors_header(fpath).items():
                if weight_map is None or weight_map.get(name) == fname:
                    self._file_of[name] = fname
                    self._info[name] = info
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._file_of]
            if missing:
                raise CheckpointError(
                    f"model {self.label!r}: tensor {missing[0]} listed in the index is not in its shard")
        self.tied = bool(self.config.get("tie_word_embeddings", False)) and "lm_head.weight" not in self._info
        self.names: list[str] = list(self._file_of)

    # --- metadata -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._info or (self.tied and name == "lm_head.weight")

    def _resolve(self, name: str) -> str:
        if name not in self._info and self.tied and name == "lm_head.weight":
            return self.embed_name()
        if name not in self._info:
            raise CheckpointError(f"model {self.label!r}: has no tensor {name!r}; are the models the same architecture?")
        return name

    def embed_name(self) -> str:
        for cand in ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight"):
            if cand in self._info:
                return cand
        raise CheckpointError(f"model {self.label!r}: tied embeddings but no embedding tensor found")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[self._resolve(name)]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self._info[self._resolve(name)]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self._info[self._resolve(name)]["data_offsets"]
        return end - start

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    # --- data -----------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory of its own. Not an mmap view: mapped pages, once read, count
        in the process's RSS until the file is unmapped, so a merge would grow to all its inputs."""
        real = self._resolve(name)
        if real in self._pickled:
            return self._pickled[real]
        fname = self._file_of[real]
        fh = self._handles.get(fname)
        if fh is None:
            try:
                fh = open(self.path / fname, "rb", buffering=0)
                (n,) = struct.unpack("<Q", os.pread(fh.fileno(), 8, 0))
            except (OSError, struct.error) as e:
                raise CheckpointError(f"{self.path / fname}: cannot open ({e})") from None
            self._handles[fname] = fh
            self._data_start[fname] = 8 + n
        info = self._info[real]
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if len(view) != end - start:
            raise CheckpointError(f"{self.path / fname}: tensor {real!r} has {end - start} bytes for shape "
                                  f"{info['shape']}; re-save the checkpoint")
        pos, offset = 0, self._data_start[fname] + start
        while pos < len(view):
            try:
                got = os.preadv(fh.fileno(), [view[pos:]], offset + pos)
            except OSError as e:
                raise CheckpointError(f"{self.path / fname}: cannot read tensor {real!r} ({e})") from None
            if got <= 0:
                raise CheckpointError(f"{self.path / fname}: file ends inside tensor {real!r}; re-download it")
            pos += got
        return out

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def _load_pickles(self, names: list[str]) -> None:
        """Only with --allow-pickle: plain tensors via torch.load(weights_only=True), which refuses
        to run code or build arbitrary objects; mmap keeps the tensors on disk until read."""
        index = self.path / PICKLE_INDEX_NAME
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e}); re-save the checkpoint") from None
        st_name = {v: k for k, v in _ST_DTYPES.items()}
        for fname in names:
            fpath = self.path / fname
            try:
                try:
                    state = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):  # legacy (non-zip) files cannot be mmapped
                        raise
                    state = torch.load(fpath, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{fpath}: refused as pickle weights ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}); only plain tensors "
                                      f"load with --allow-pickle") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{fpath}: not a state dict of tensors; re-save it with "
                                      f"torch.save(model.state_dict())")
            for name, t in state.items():
                if t.dtype not in st_name:
                    raise CheckpointError(f"{fpath}: tensor {name!r} has unsupported dtype {t.dtype}")
                self._pickled[name] = t
                self._file_of[name] = fname
                self._info[name] = {"shape": list(t.shape), "dtype": st_name[t.dtype],
                                    "data_offsets": [0, t.numel() * t.element_size()]}


def is_pickle_weights(name: str) -> bool:
    """A .bin/.pt/.pth file that holds model weights (not trainer state)."""
    base = name.rsplit("/", 1)[-1]
    return base.endswith((".bin", ".pt", ".pth")) and not _NOT_WEIGHTS.fullmatch(base)


def load_config(path: Path, label: str) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"model {label!r}: {cfg} is missing; a model folder needs its config.json")
    try:
        data = json.loads(cfg.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    return data
