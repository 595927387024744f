"""Streaming sharded safetensors writer and the atomic output directory.

Tensors are buffered until a shard would exceed `max_shard_bytes`, then written as a temporary
shard; `finish()` renames shards to `model-0000k-of-0000n.safetensors` and writes the index
(or a single `model.safetensors` when everything fit in one shard).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from merger.errors import OutputError

DEFAULT_SHARD_BYTES = 5 * 1000**3
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4}


def parse_size(text: str | int) -> int:
    """'5GB' / '500M' / '2GiB' / 1000000 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"invalid size {text!r}; write e.g. 5GB, 500MB or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


class ShardWriter:
    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        # contiguous() is a no-op for merged results; it guards views of mmapped inputs.
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp = self.out_dir / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(tmp), metadata=self.metadata)
        sort_header_metadata(tmp)
        self._shards.append((tmp, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def finish(self) -> list[str]:
        """Write what is buffered, name the shards, write the index; returns the shard file names."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map: dict[str, str] = {}
        for (tmp, tensors), fname in zip(self._shards, names):
            os.replace(tmp, self.out_dir / fname)
            os.chmod(self.out_dir / fname, 0o666 & ~_umask())
            weight_map.update({t: fname for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def sort_header_metadata(path: Path) -> None:
    """safetensors serialises `__metadata__` from a hash map, in a different key order on every
    call; sort it in place (same length) so that identical merges give byte-identical files."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        meta = json.loads(raw).get("__metadata__")
        if not meta or len(meta) < 2:
            return

        def encode(m: dict) -> bytes:
            return b'"__metadata__":' + json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()

        old, new = encode(meta), encode(dict(sorted(meta.items())))
        at = raw.find(old)
        if at >= 0 and len(old) == len(new):
            f.seek(8 + at)
            f.write(new)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on error it vanishes."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise OutputError(f"output {out_dir} already exists; choose another folder or pass --force")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a folder; remove it first")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merger-tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    except OSError as e:
        raise OutputError(f"cannot create output next to {out_dir} ({e.strerror}); check the path and permissions") from None
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.merger-old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
