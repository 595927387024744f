"""Streaming sharded safetensors writer.

Names, shapes and dtypes are known before any tensor is computed (from the plan), so the shards are
laid out up front: each shard's header is written first, its space reserved (a full disk fails before
the merge starts), and every tensor goes straight to its offset when it is ready; nothing is buffered.
A method that can computes straight into its tensor's place in the file (`mapped`).
The files are laid out as safetensors' own `save_file` lays them out (tensors by dtype, then name;
header padded to 8 bytes), so identical merges give byte-identical files. `finish()` writes the index
(or a single `model.safetensors` when everything fits in one shard).
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from merger.errors import OutputError
from merger.io.checkpoint import INDEX_NAME

DEFAULT_SHARD_BYTES = 5 * 1000**3
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4}
# safetensors' dtype names, in the order its writer places them (then by name)
_ST_NAMES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
             torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
_RANK = {dt: k for k, dt in enumerate(_ST_NAMES)}
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor as the writer needs it: its name, shape and saved dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Shard:
    file: str
    names: list[str]
    header: bytes                       # the 8-byte length and the padded JSON
    offsets: dict[str, int]             # absolute file offset of each tensor's data
    size: int                           # the whole file
    fd: int = -1
    reserved: bool = False              # its blocks are allocated: writes through a mapping cannot hit a full disk


def _layout(file: str, specs: list[TensorSpec], metadata: dict[str, str]) -> _Shard:
    order = sorted(specs, key=lambda s: (_RANK[s.dtype], s.name))
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    rel: dict[str, int] = {}
    for s in order:
        entries[s.name] = {"dtype": _ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        rel[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    header = len(raw).to_bytes(8, "little") + raw
    return _Shard(file, [s.name for s in specs], header, {n: len(header) + o for n, o in rel.items()},
                  len(header) + pos)


def planned_header(specs: list[TensorSpec]) -> dict[str, dict[str, object]]:
    """The header entries one file holding `specs` would have (for a stage that is planned, not built)."""
    header, pos = {}, 0
    for s in sorted(specs, key=lambda s: (_RANK[s.dtype], s.name)):
        header[s.name] = {"dtype": _ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    return header


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in plan order, a new shard whenever the next tensor would overflow the current one."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for s in specs:
        if shards and shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        if not shards:
            shards.append([])
        shards[-1].append(s)
        size += s.nbytes
    return shards or [[]]


def disk_error(e: OSError, path: Path, need: int) -> OutputError:
    """One line for a failed write: a full disk (or quota, or file-size limit) says how much is needed."""
    if e.errno in _FULL_DISK:
        return OutputError(f"{path}: no space left for the output ({e.strerror}; it needs {need / 1e9:.2f} GB); "
                           f"free some space or choose another folder")
    return OutputError(f"{path}: cannot write the output ({e.strerror or e}); check the folder and its permissions")


class ShardWriter:
    """Writes the tensors of `specs` into shards in `out_dir`, each tensor once, in any order."""

    def __init__(self, out_dir: str | Path, specs: Iterable[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        specs = list(specs)
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            dup = next(s.name for k, s in enumerate(specs) if s.name in {t.name for t in specs[:k]})
            raise ValueError(f"tensor {dup} is planned twice")
        meta = {"format": "pt", **(metadata or {})}
        groups = plan_shards(specs, max_shard_bytes)
        n = len(groups)
        files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.shards = [_layout(f, g, meta) for f, g in zip(files, groups)]
        self._shard_of = {name: sh for sh in self.shards for name in sh.names}
        self._written: set[str] = set()
        self.total_bytes = sum(s.nbytes for s in specs)
        self.written_bytes = 0

    @property
    def files(self) -> list[str]:
        return [sh.file for sh in self.shards]

    def __enter__(self) -> ShardWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create every shard with its header and reserve its full size on disk."""
        for sh in self.shards:
            path = self.out_dir / sh.file
            try:
                sh.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                _write_all(sh.fd, sh.header, 0)
                sh.reserved = _reserve(sh.fd, sh.size)
            except OSError as e:
                raise disk_error(e, path, self.total_bytes) from None

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write one planned tensor at its offset; returns the shard's file descriptor."""
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"tensor {name} is not in the plan")
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name} is {list(tensor.shape)} {tensor.dtype}, planned {list(spec.shape)} {spec.dtype}")
        sh = self._shard_of[name]
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if spec.nbytes:
            try:
                _write_all(sh.fd, memoryview(data.view(torch.uint8).numpy()), sh.offsets[name])
            except OSError as e:
                raise disk_error(e, self.out_dir / sh.file, self.total_bytes) from None
        return self.wrote(name)

    def mapped(self, name: str) -> torch.Tensor | None:
        """Planned tensor `name` as a writable view of its bytes in the shard (a shared mapping), for a method to
        compute into: no buffer of its own to fault in and no copy into the page cache. Unmapped when the last
        view goes. None where that is not safe or possible: blocks not reserved (a full disk would then kill the
        process), an offset not aligned to the dtype, no data, no mmap."""
        spec = self.specs[name]
        sh = self._shard_of[name]
        offset, n = sh.offsets[name], spec.nbytes
        if not sh.reserved or n == 0 or offset % spec.dtype.itemsize or name in self._written:
            return None
        first = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            region = mmap.mmap(sh.fd, offset + n - first, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=first)
        except (OSError, ValueError, AttributeError):
            return None
        # Pages fault in as the method writes them. MADV_POPULATE_WRITE first was slower here (ext4: linear
        # 3 x 2.7 GB took 7.0 s against 4.9 s), as it readies every reserved block's page up front.
        raw = torch.frombuffer(region, dtype=torch.uint8, offset=offset - first, count=n)
        return raw.view(spec.dtype).view(spec.shape)

    def wrote(self, name: str) -> int:
        """Planned tensor `name` is in its shard (written, or computed into its `mapped` view); returns the
        shard's file descriptor."""
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        self._written.add(name)
        self.written_bytes += self.specs[name].nbytes
        return self._shard_of[name].fd

    def finish(self) -> list[str]:
        """Check every planned tensor was written, flush the shards to disk, write the index."""
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            raise ValueError(f"tensor {missing[0]} was planned but never written")
        try:
            for sh in self.shards:
                os.fsync(sh.fd)
            if len(self.shards) > 1:
                weight_map = {name: sh.file for sh in self.shards for name in sh.names}
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        except OSError as e:
            raise disk_error(e, self.out_dir, self.total_bytes) from None
        self.close()
        return self.files

    def close(self) -> None:
        for sh in self.shards:
            if sh.fd >= 0:
                os.close(sh.fd)
                sh.fd = -1


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def _reserve(fd: int, size: int) -> bool:
    """Allocate the file's blocks now where the filesystem can (else just set its length); True if allocated."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)
    return False


def write_tensors(out_dir: str | Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write a dict of tensors at once (tests, synthetic checkpoints, benchmarks)."""
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with ShardWriter(out_dir, specs, max_shard_bytes, metadata) as w:
        for n, t in tensors.items():
            w.write(n, t)
        return w.finish()
