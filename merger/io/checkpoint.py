"""Lazy reader for a Hugging Face-format folder: config.json + model.safetensors or a sharded index.

Tensors are read one at a time through safetensors' mmap; nothing is loaded until asked for.
Tied embeddings (`tie_word_embeddings` and no `lm_head.weight`) expose lm_head as the embedding.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from merger.errors import CheckpointError
from merger.io.safetensors_file import ST_DTYPES, SafetensorsFile, read_safetensors_header, regular_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
# Pickled trainer state that sits beside weights in many repos and is never a model.
_NOT_WEIGHTS = re.compile(r"(training_args|optimizer|scheduler|scaler|rng_state.*|trainer_state)\.(bin|pt|pth)")


LAYER_RE = re.compile(r"^(.*?layers\.)(\d+)(\..+)$")
DECODER_LAYERS = "model.layers."
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json and the shard index are kilobytes


def split_layer(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.', 3, '.mlp.up_proj.weight')."""
    m = LAYER_RE.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def read_json(path: Path, what: str) -> Any:
    """A small JSON file (config.json, an index): CheckpointError naming it when it cannot be read."""
    if not regular_file(path):
        raise CheckpointError(f"{path}: {what} is not a regular file; re-download the checkpoint")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {what} is larger than {MAX_JSON_BYTES // 2**20} MiB; is it the right file?")
        return json.loads(path.read_bytes())
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested too deeply to be a real {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e}); re-download the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def confined_name(name: Any) -> bool:
    """An index entry must name a file inside the model folder: relative, no `..`, no backslashes."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)


class Checkpoint:
    """One model folder. `names` keeps the on-disk order; `get(name)` reads a single tensor."""

    def __init__(self, path: str | Path, label: str | None = None, allow_pickle: bool = False,
                 remote_headers: dict[str, dict[str, dict[str, Any]]] | None = None):
        """`remote_headers` ({file: parsed header}) stands in for weight files not downloaded (a Hub
        model checked by `merger validate`): names and shapes are known, reading data is refused."""
        self.path = Path(path)
        self.remote = dict(remote_headers or {})
        self.label = label or str(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model {self.label!r}: folder {self.path} does not exist")
        self.config = load_config(self.path, self.label)
        self._file_of: dict[str, str] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self._headers: dict[str, dict[str, dict[str, Any]]] = {}
        self._readers: dict[str, SafetensorsFile] = {}
        self.read_ahead: Any = None  # merger.stream.ReadAhead while a plan runs
        self._pickled: dict[str, torch.Tensor] = {}
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).exists() or SINGLE_NAME in self.remote:
            files, weight_map = [SINGLE_NAME], None
        elif self.remote:
            files, weight_map = sorted(self.remote), None
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors") if regular_file(p))
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
            if fname in self.remote and not fpath.exists():
                header = self.remote[fname]
            elif not fpath.exists():
                raise CheckpointError(f"model {self.label!r}: shard {fname} named in the index is missing")
            else:
                header = read_safetensors_header(fpath)
            self._headers[fname] = header
            for name, info in header.items():
                if weight_map is None and name in self._file_of:
                    raise CheckpointError(f"model {self.label!r}: tensor {name!r} is in both {self._file_of[name]} "
                                          f"and {fname}; keep one copy (or write an index)")
                if weight_map is None or weight_map.get(name) == fname:
                    self._file_of[name] = fname
                    self._info[name] = info
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._file_of]
            if missing:
                raise CheckpointError(
                    f"model {self.label!r}: tensor {missing[0]} listed in the index is not in its shard")
        self.tied = self.config.get("tie_word_embeddings") is True and "lm_head.weight" not in self._info
        self.names: list[str] = list(self._file_of)
        self.num_layers = config_layers(self.config, self.path / "config.json")
        check_stored_layers(self.names, self.num_layers, self.path)

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
        return ST_DTYPES[self._info[self._resolve(name)]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self._info[self._resolve(name)]["data_offsets"]
        return end - start

    # --- data -----------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory of its own. While a plan runs, the tensor may come from the
        read-ahead instead: a mapping of that one tensor (or a pooled buffer), held until the output it
        feeds is written."""
        if self.read_ahead is not None:
            t = self.read_ahead.take(self, name)
            if t is not None:
                return t
        real = self._resolve(name)
        if real in self._pickled:
            return self._pickled[real]
        return self._reader(real).get(real)

    def read_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """Tensor `name` read into the front of the uint8 tensor `buf` (for the read-ahead's pooled buffers)."""
        real = self._resolve(name)
        if real in self._pickled:
            return self._pickled[real]
        return self._reader(real).read_into(real, buf)

    def map(self, name: str) -> torch.Tensor | None:
        """Tensor `name` mapped from its file for the read-ahead (SafetensorsFile.map), or None: read it."""
        real = self._resolve(name)
        if real in self._pickled:
            return self._pickled[real]
        return self._reader(real).map(real)

    def _reader(self, real: str) -> SafetensorsFile:
        fname = self._file_of[real]
        if fname in self.remote and not (self.path / fname).exists():
            raise CheckpointError(f"model {self.label!r}: {fname} was not downloaded (headers only); "
                                  f"build the recipe to fetch the weights")
        reader = self._readers.get(fname)
        if reader is None:
            reader = self._readers[fname] = SafetensorsFile(self.path / fname, self._headers[fname])
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _load_pickles(self, names: list[str]) -> None:
        """Only with --allow-pickle: plain tensors via torch.load(weights_only=True), which refuses
        to run code or build arbitrary objects; mmap keeps the tensors on disk until read."""
        index = self.path / PICKLE_INDEX_NAME
        if index.exists():
            names = sorted(set(read_index(index).values()))
        st_name = {v: k for k, v in ST_DTYPES.items()}
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


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a shard index: tensor name -> a shard file inside the model folder."""
    data = read_json(index, "the shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointError(f"{index}: invalid index (no `weight_map` mapping tensor names to files); "
                              f"re-save the checkpoint")
    for name, fname in weight_map.items():
        if not confined_name(fname):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {fname!r}, which is not a file inside the "
                                  f"model folder; fix the index")
    return weight_map


def load_config(path: Path, label: str) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"model {label!r}: {cfg} is missing; a model folder needs its config.json")
    data = read_json(cfg, "config.json")
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    return data


def config_layers(config: dict[str, Any], where: Path) -> int:
    """config.json's num_hidden_layers (0 when absent): a non-negative integer, or CheckpointError."""
    n = config.get("num_hidden_layers", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CheckpointError(f"{where}: num_hidden_layers {n!r} is not a non-negative integer; fix config.json")
    return n


def check_stored_layers(names: list[str], num_layers: int, folder: Path) -> None:
    """The decoder layers the weights hold (`model.layers.N.*`) must be exactly those config.json counts."""
    stored = {sp[1] for n in names if n.startswith(DECODER_LAYERS) and (sp := split_layer(n))}
    if not stored:
        return
    extra = sorted(i for i in stored if i >= num_layers)
    if extra:
        first = next(n for n in names if n.startswith(DECODER_LAYERS) and (sp := split_layer(n)) and sp[1] == extra[0])
        raise CheckpointError(f"{folder}: config.json says {num_layers} layers but the weights hold layer "
                              f"{extra[0]} ({first}); fix num_hidden_layers in config.json")
    missing = sorted(set(range(num_layers)) - stored)
    if missing:
        raise CheckpointError(f"{folder}: config.json says {num_layers} layers but the weights have no layer "
                              f"{missing[0]}; fix num_hidden_layers or restore the missing shard")
