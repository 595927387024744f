"""GGUF -> Hugging Face folder: llama.cpp tensor names mapped to the Llama layout, q/k rows put back
in Hugging Face's rotary order, config.json from the metadata, tokenizer files; streamed and atomic.
Also the converted-once cache behind GGUF model references in recipes (`cached_folder`)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merger.cache import cache_dir
from merger.errors import CheckpointError, OutputError
from merger.io.dtypes import dtype_name, parse_dtype
from merger.io.gguf_tokenizer import check_tokenizer, special_token_ids, write_tokenizer_files
from merger.io.hf import write_config
from merger.io.output import StagedOutput, check_output
from merger.io.writer import DEFAULT_SHARD_BYTES, ShardWriter, TensorSpec

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Its converter regroups each head's rows from Hugging
    Face's rotate-half order (first halves, then second halves) into interleaved pairs, because
    llama.cpp's rope rotates adjacent elements; Hugging Face's rope needs the halves back."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_config(md: dict[str, Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """config.json for a Llama/Mistral GGUF; CheckpointError for what this converter cannot represent."""
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)}); convert it with a tool that knows it")

    def get(key: str, default: Any = ...) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is ...:
            raise CheckpointError(f"{path}: metadata {arch}.{key} is missing; the GGUF file is incomplete")
        return value

    if get("expert_count", 0):
        raise CheckpointError(f"{path}: Mixture-of-Experts GGUF files are not supported; convert a dense model")
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: Llama 3.1-style rope scaling (rope_freqs) is not supported yet; "
                              f"use the Hugging Face checkpoint of this model")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported yet; use the Hugging Face "
                              f"checkpoint of this model")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise CheckpointError(f"{path}: per-layer attention head counts are not a Llama layout; not supported")
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings are not a Llama layout; not supported")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor; the GGUF file is incomplete")
    ids = special_token_ids(md) if "tokenizer.ggml.tokens" in md else {}
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(kv_heads), "head_dim": head_dim,
        "vocab_size": int(embed.shape[0]), "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": False,
        **{f"{role}_token_id": i for role, i in ids.items() if role in ("bos", "eos", "pad")},
    }
    if arch == "mistral":
        cfg["sliding_window"] = get("attention.sliding_window", None)
    return cfg


def tensor_plan(tensors: dict[str, Any], cfg: dict[str, Any], path: Path) -> list[tuple[str, str, int | None]]:
    """(gguf name, Hugging Face name, heads to un-permute or None) for every tensor, in file order."""
    out = []
    for name in tensors:
        base, _, suffix = name.rpartition(".")
        m = _BLOCK_RE.fullmatch(name)
        if base in _GLOBAL and suffix == "weight":
            out.append((name, f"{_GLOBAL[base]}.weight", None))
        elif m and m.group(2) in _BLOCK and int(m.group(1)) < cfg["num_hidden_layers"]:
            layer, key, kind = m.groups()
            heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}.get(key)
            out.append((name, f"model.layers.{layer}.{_BLOCK[key]}.{kind}", heads))
        else:
            raise CheckpointError(f"{path}: tensor {name!r} has no place in a Llama checkpoint; this GGUF is "
                                  f"not a plain Llama/Mistral model")
    names = {hf for _, hf, _ in out}
    need = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{v}.weight" for i in range(cfg["num_hidden_layers"]) for v in _BLOCK.values()]
    missing = [n for n in need if n not in names]
    if missing:
        raise CheckpointError(f"{path}: no tensor for {missing[0]} ({len(missing)} missing); the GGUF file is "
                              f"incomplete")
    return out


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
        plan = tensor_plan(f.tensors, cfg, src)
        if tokenizer:
            check_tokenizer(md, src)
        check_output(out_dir, force, files={"the GGUF file": src})
        specs = [TensorSpec(hfname, f.tensors[gname].shape, dtype) for gname, hfname, _ in plan]
        staged = StagedOutput(out_dir, force)
        with staged as tmp:
            meta = {"merger_source": "gguf", "gguf_file": src.name}
            with ShardWriter(tmp, specs, shard_bytes, meta) as writer:
                for k, (gname, hfname, heads) in enumerate(plan):
                    t = f.get(gname, dtype)
                    writer.write(hfname, unpermute_rotary(t, heads) if heads else t)
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
