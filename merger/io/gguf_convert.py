"""GGUF -> Hugging Face folder: every tensor dequantized, renamed and un-done as gguf_arch says (Llama,
Mistral, Qwen2, Qwen3, Gemma 3), config.json from the metadata, tokenizer files; streamed and atomic.
Also the converted-once cache behind GGUF model references in recipes (`cached_folder`)."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merger.cache import cache_dir
from merger.errors import CheckpointError, OutputError
from merger.io.dtypes import dtype_name, parse_dtype
from merger.io.gguf_arch import apply, hf_config, tensor_plan
from merger.io.gguf_tokenizer import check_tokenizer, write_tokenizer_files
from merger.io.hf import write_config
from merger.io.output import StagedOutput, check_output
from merger.io.writer import DEFAULT_SHARD_BYTES, ShardWriter, TensorSpec



def convert_gguf(src: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32, force: bool = False,
                 tokenizer: bool = True, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Callable[[int, int, int], None] | None = None) -> Path:
    """Write a Hugging Face folder for the GGUF file `src` into `out_dir` (which appears only when
    complete). Tensors are dequantized to `dtype` one at a time and streamed to shards."""
    from merger.io.gguf import GGUFFile  # needs the gguf extra; imported only when a GGUF is read

    src = Path(src)
    with GGUFFile(src) as f:
        md = f.metadata
        if int(md.get("split.count", 1)) > 1:
            raise CheckpointError(f"{src}: part of a split GGUF; join the parts first (llama-gguf-split --merge)")
        cfg = hf_config(md, f.tensors, src)
        plan = tensor_plan(f.tensors, cfg, md, src)
        if tokenizer:
            check_tokenizer(md, src)
        check_output(out_dir, force, files={"the GGUF file": src})
        specs = [TensorSpec(step.hf, f.tensors[step.gguf].shape, dtype) for step in plan]
        staged = StagedOutput(out_dir, force)
        with staged as tmp:
            meta = {"merger_source": "gguf", "gguf_file": src.name}
            with ShardWriter(tmp, specs, shard_bytes, meta) as writer:
                for k, step in enumerate(plan):  # fixes in float32, then the output dtype
                    writer.write(step.hf, apply(step, f.get(step.gguf)).to(dtype))
                    if progress:
                        progress(k + 1, len(plan), writer.written_bytes, writer.total_bytes)
                writer.finish()
            write_config(tmp, cfg, dtype)
            if tokenizer:
                write_tokenizer_files(md, tmp, cfg["max_position_embeddings"])
            staged.publish()
    return Path(out_dir)


# --- GGUF files as recipe inputs: converted once into a content-addressed cache -------------------

def gguf_source(path: Path) -> Path | None:
    """The GGUF file behind a model reference: a .gguf file, or a folder holding one and no config.json."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{path}: holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); "
                                  f"reference the one to use")
        return found[0] if found else None
    return None


def content_key(path: Path, root: Path) -> str:
    """sha256 of the file's bytes (a fine-tune can share every header byte with its base). The hash is
    remembered per (path, size, mtime, inode), so a file is read in full only once."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo = root / "stat" / hashlib.sha1(stamp.encode()).hexdigest()
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            h.update(chunk)
    key = h.hexdigest()[:24]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(key + "\n")
    os.replace(tmp, memo)
    return key


def cached_folder(path: Path, dtype: torch.dtype | str | None = None, root: Path | None = None,
                  echo: Callable[[str], None] | None = None) -> Path:
    """The Hugging Face folder for GGUF file `path` at `dtype` (default float32, which holds every
    dequantized value exactly), converting it on first use."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    root = root or cache_dir("gguf")
    out = root / f"{content_key(path, root)}-{dtype_name(dtype)}"
    if (out / "config.json").is_file():
        return out
    say = echo or (lambda m: print(m, file=sys.stderr))
    say(f"converting {path.name} to a Hugging Face folder in {out} (once)")
    t0 = time.perf_counter()
    try:
        convert_gguf(path, out, dtype=dtype)
    except (OSError, OutputError):
        if (out / "config.json").is_file():  # another process finished the same conversion first
            return out
        raise
    say(f"converted {path.name} in {time.perf_counter() - t0:.1f}s")
    return out


def resolve_gguf(path: Path, options: dict[str, Any]) -> Path | None:
    """Resolver step for merger.builtin: a GGUF reference becomes its cached folder, anything else None."""
    src = gguf_source(path)
    if src is None:
        return None
    root = Path(options["gguf_cache"]) if options.get("gguf_cache") else None
    return cached_folder(src, options.get("dtype"), root)
