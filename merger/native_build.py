"""Compiling merger's small C sources with the system compiler, once per set of sources and flags, into the
merger cache (`cache_dir("kernels")`), and loading them with ctypes. Shared by the engine's kernels and the merge
methods' mask kernels; each caller declares its functions' signatures. MERGER_NATIVE=0 turns all of them off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from merger.cache import cache_dir

# the suffix of a kernel's exported name for each element type it is built for (merger_gemv_bf16, ...)
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def avx2_missing() -> str | None:
    """Why an x86 CPU cannot run kernels built with AVX2 and FMA (torch reports no AVX2 there), else None."""
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine() == "x86_64" and cap not in ("AVX2", "AVX512"):
        return f"CPU capability {cap} lacks AVX2"
    return None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def source_key(files: list[Path], flags: list[str], libs: list[str], cc: str | None = None) -> str:
    """Hash of the files (sources and the headers they include), the compiler and its flags: the compiled
    library's key."""
    cc = cc or compiler() or ""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    digest.update(" ".join([cc, *flags, *libs]).encode())
    return digest.hexdigest()[:16]


def load(name: str, sources: list[Path], headers: list[Path], flags: list[str],
         libs: list[str]) -> tuple[ctypes.CDLL | None, str]:
    """(the library `name` built from `sources`, which include `headers`, or None, and why): compiled at most
    once per key, reused by every process after; a concurrent build just replaces the file with the same
    bytes."""
    if os.environ.get("MERGER_NATIVE", "1") == "0":
        return None, "disabled by MERGER_NATIVE=0"
    cc = compiler()
    if not cc:
        return None, "no C compiler found (set CC)"
    lib_path = cache_dir("kernels") / f"{name}-{source_key([*sources, *headers], flags, libs, cc)}.so"
    if not lib_path.exists():
        try:
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                out = Path(tmp) / lib_path.name
                subprocess.run([cc, *flags, *map(str, sources), "-o", str(out), *libs], check=True,
                               capture_output=True, timeout=240)
                os.replace(out, lib_path)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            first = detail.decode(errors="replace").strip().splitlines()[:1]
            return None, f"compiling {name} failed: {first[0] if first else e}"
    try:
        return ctypes.CDLL(str(lib_path)), str(lib_path)
    except OSError as e:
        return None, f"loading {lib_path} failed: {e}"
