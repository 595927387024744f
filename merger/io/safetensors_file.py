"""One .safetensors file: its header, validated as the safetensors library validates it (known dtypes,
shapes of non-negative ints, offsets that tile the data section exactly), and single tensors read
into memory of their own with pread, or mapped one tensor at a time for the read-ahead (a mapping of the
whole file would keep every page read in the RSS until the end)."""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from merger.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000   # safetensors' own limit
ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14: map every page in one call


def _int_list(v: Any, n: int | None = None) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))


def parse_safetensors_header(raw: bytes, data_size: int) -> dict[str, dict[str, Any]]:
    """Validate a safetensors header (the JSON after the 8-byte length) for a data section of
    `data_size` bytes: every entry has a known dtype, a shape of non-negative ints and offsets whose
    byte count fits that shape, and the entries tile the data section exactly (no overlap, no gap),
    as the safetensors library itself requires. ValueError says what is wrong."""
    try:
        header = json.loads(raw)
    except RecursionError:
        raise ValueError("header JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ is not a mapping of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not _int_list(shape):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not _int_list(offsets, 2) or offsets[0] > offsets[1]:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are not two ascending integers")
        if offsets[1] > data_size:
            raise ValueError(f"tensor {name!r} points outside the file")
        if (offsets[1] - offsets[0]) != math.prod(shape) * ST_DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {name!r} has {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}")
        spans.append((offsets[0], offsets[1], name))
    pos = 0
    for start, end, name in sorted(spans):
        if start != pos:
            raise ValueError(f"tensor {name!r} {'overlaps the one before it' if start < pos else 'leaves a gap'} "
                             f"(offset {start}, expected {pos})")
        pos = end
    if pos != data_size:
        raise ValueError(f"the tensors cover {pos} of the file's {data_size} data bytes")
    return header


def regular_file(path: Path) -> bool:
    """True for a regular file (or a link to one): never a FIFO or device that would block a read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a .safetensors header without touching tensor data; CheckpointError if it is corrupt."""
    try:
        if not regular_file(path):
            raise ValueError("not a regular file")
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            return parse_safetensors_header(f.read(n), size - 8 - n)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); re-download or re-save the checkpoint"
        ) from None


class SafetensorsFile:
    """Reads tensors of one file by name; the header may come from elsewhere (already parsed)."""

    def __init__(self, path: Path, header: dict[str, dict[str, Any]] | None = None):
        self.path = Path(path)
        self.header = read_safetensors_header(self.path) if header is None else header
        self._fh: Any = None
        self._start = 0
        self._lock = threading.Lock()  # the read-ahead thread and the merge may open it at once

    def _open(self) -> int:
        with self._lock:
            if self._fh is None:
                try:
                    fh = open(self.path, "rb", buffering=0)
                    (n,) = struct.unpack("<Q", os.pread(fh.fileno(), 8, 0))
                except (OSError, struct.error) as e:
                    raise CheckpointError(f"{self.path}: cannot open ({e})") from None
                self._start, self._fh = 8 + n, fh
        return self._fh.fileno()

    def nbytes(self, name: str) -> int:
        start, end = self.header[name]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` in memory of its own."""
        return self.read_into(name, torch.empty(max(self.nbytes(name), 1), dtype=torch.uint8))

    def read_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """Tensor `name` read with pread into the front of the uint8 tensor `buf` (a view of it)."""
        fd = self._open()
        info = self.header[name]
        start, end = info["data_offsets"]
        n = end - start
        view = memoryview(buf[:n].numpy())
        pos, offset = 0, self._start + start
        while pos < n:
            try:
                got = os.preadv(fd, [view[pos:]], offset + pos)
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e})") from None
            if got <= 0:
                raise CheckpointError(f"{self.path}: file ends inside tensor {name!r}; re-download it")
            pos += got
        return buf[:n].view(ST_DTYPES[info["dtype"]]).view(info["shape"])

    def map(self, name: str) -> torch.Tensor | None:
        """Tensor `name` as a copy-on-write view of the page cache (no copy into a buffer of its own, the
        pages mapped in one call); it is unmapped when the last view of it goes. None where mapping is not
        available (then read it)."""
        fd = self._open()
        info = self.header[name]
        start, end = info["data_offsets"]
        n, offset = end - start, self._start + start
        if n == 0 or not hasattr(mmap, "MAP_PRIVATE"):
            return None
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e})") from None
        if size < offset + n:  # touching mapped pages past the end would kill the process
            raise CheckpointError(f"{self.path}: file ends inside tensor {name!r}; re-download it")
        first = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(fd, offset + n - first, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=first)
        except (OSError, ValueError):
            return None  # a file system without mmap: pread instead
        try:
            mapped.madvise(_MADV_POPULATE_READ)
        except (OSError, ValueError):
            mapped.madvise(mmap.MADV_WILLNEED)  # older kernels: read ahead, fault as touched
        raw = torch.frombuffer(mapped, dtype=torch.uint8, offset=offset - first, count=n)
        return raw.view(ST_DTYPES[info["dtype"]]).view(info["shape"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
