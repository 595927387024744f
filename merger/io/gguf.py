"""Reading GGUF files (llama.cpp's format): the header parsed here, tensors dequantized with the
`gguf` package's numpy kernels (`pip install 'merger[gguf]'`). The header is parsed by hand because
gguf.GGUFReader builds one numpy view per vocabulary string (~8 s for a 49k-token vocabulary, ~0.2 s here).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

try:  # numpy comes with the gguf extra; without it require_gguf() explains what to install
    import numpy as np
except ImportError:  # pragma: no cover - torch does not need numpy
    np = None  # type: ignore[assignment]

from merger.errors import CheckpointError, MergerError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types (the spec's numbering): scalar struct formats; 8 is STRING, 9 is ARRAY.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
               12: "<f8"}
_STRING, _ARRAY = 8, 9
# ggml types read without the dequantizer: plain floats.
_F32, _F16, _BF16 = 0, 1, 30
# llama.cpp's token types (llama_token_type); control tokens are special, user-defined ones added but not special.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GGUFMissingError(MergerError):
    """The optional `gguf` package (the dequantizer) is not installed."""


def require_gguf(what: str) -> ModuleType:
    """Import the `gguf` package or say how to install it."""
    try:
        import gguf
    except ImportError:
        raise GGUFMissingError(f"{what} is a GGUF file; reading it needs the gguf package: "
                               f"pip install 'merger[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # numpy / PyTorch order (GGUF lists dimensions innermost first)
    qtype: int               # ggml type id
    type_name: str
    offset: int              # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Little-endian reads from a buffer, with a file-named error when the header runs out."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise CheckpointError(f"{self.path}: GGUF header is truncated; re-download the file")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: GGUF header is truncated; re-download the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("I"), self.take("Q")
            if itype in _NP_SCALARS:  # numeric arrays (token types, scores) in one numpy read
                dt = np.dtype(_NP_SCALARS[itype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise CheckpointError(f"{self.path}: GGUF header is truncated; re-download the file")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos = end
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        raise CheckpointError(f"{self.path}: unknown GGUF value type {vtype}; the file is corrupt or newer "
                              f"than this reader")


class GGUFFile:
    """One GGUF file: `metadata` (key -> value), `tensors` (name -> TensorInfo, file order), `get(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._gguf = require_gguf(str(self.path))
        try:
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file; check the path") from None
        except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
            reason = getattr(e, "strerror", None) or e
            raise CheckpointError(f"{self.path}: cannot read ({reason}); check the file") from None
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _parse(self) -> None:
        cur = _Cursor(self._map, self.path)
        if len(self._map) < 24 or self._map[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (no GGUF magic); pass a .gguf model file")
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            hint = "big-endian GGUF files are not supported" if version > 0xFFFF else f"version {version}"
            raise CheckpointError(f"{self.path}: unsupported GGUF ({hint}); re-export it with a current llama.cpp")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("Q") for _ in range(cur.take("I"))]
            infos.append((name, tuple(reversed(dims)), cur.take("I"), cur.take("Q")))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // align) * align
        self.header_bytes = cur.pos
        types = self._gguf.GGMLQuantizationType
        for name, shape, qtype, rel in infos:
            try:
                type_name = types(qtype).name
                block, size = self._gguf.GGML_QUANT_SIZES[types(qtype)]
            except (ValueError, KeyError):
                raise CheckpointError(f"{self.path}: tensor {name} has ggml type {qtype}, unknown to the installed "
                                      f"gguf package; upgrade it (pip install -U gguf)") from None
            n = int(np.prod(shape)) if shape else 1
            if shape and shape[-1] % block:
                raise CheckpointError(f"{self.path}: tensor {name} row of {shape[-1]} is not a whole number of "
                                      f"{type_name} blocks; the file is corrupt")
            info = TensorInfo(name, shape, qtype, type_name, data_start + rel, n // block * size)
            if info.offset + info.nbytes > len(self._map):
                raise CheckpointError(f"{self.path}: tensor {name} points past the end of the file; "
                                      f"the download is probably incomplete")
            self.tensors[name] = info

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to `dtype`, in PyTorch's dimension order (a fresh copy)."""
        info = self.tensors[name]
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.qtype == _F32:
            return torch.from_numpy(raw.view("<f4").reshape(info.shape).copy()).to(dtype)
        if info.qtype == _F16:
            return torch.from_numpy(raw.view("<f2").reshape(info.shape).copy()).to(dtype)
        if info.qtype == _BF16:  # exact: reinterpret the bits instead of going through float32 numpy
            bits = torch.from_numpy(raw.view("<i2").reshape(info.shape).copy())
            return bits.view(torch.bfloat16).to(dtype)
        byte_shape = self._gguf.quant_shape_to_byte_shape(info.shape, self._gguf.GGMLQuantizationType(info.qtype))
        try:
            out = self._gguf.quants.dequantize(raw.reshape(byte_shape), self._gguf.GGMLQuantizationType(info.qtype))
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name} is {info.type_name}, which the installed gguf package "
                                  f"cannot dequantize; upgrade it (pip install -U gguf)") from None
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(dtype)

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
