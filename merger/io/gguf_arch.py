"""What each GGUF architecture is in Hugging Face terms: llama.cpp's tensor names mapped to the HF layout
of Llama, Mistral, Qwen2, Qwen3 and Gemma 3, the per-tensor fixes llama.cpp's converter made (q/k rows
interleaved for Llama-style rope, 1 added to Gemma's norms) and config.json rebuilt from the metadata.
Facts are llama.cpp's (convert_hf_to_gguf.py, src/llama-model.cpp): where a file is silent, its defaults.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merger.errors import CheckpointError
from merger.io.gguf_tokenizer import special_token_ids

_ATTN = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LLAMA_BLOCK = {**_ATTN, "ffn_norm": "post_attention_layernorm"}
# Gemma 3 norms the attention and MLP outputs too; llama.cpp's ffn_norm is the norm *before* the MLP there
_GEMMA3_BLOCK = {**_ATTN, **_QK_NORM, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_QKV_BIAS = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    block: dict[str, str]
    permuted_qk: bool = False    # llama.cpp interleaves q/k rows for rope that rotates adjacent pairs
    norm_offset: float = 0.0     # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w


# GGUF general.architecture -> family. Qwen2, Qwen3 and Gemma 3 use NEOX-style rope (the rotate-half
# Hugging Face uses), so llama.cpp stores their q/k as they are; only its Llama converter permutes.
FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", _LLAMA_BLOCK, permuted_qk=True),
    "mistral": Family("mistral", "MistralForCausalLM", _LLAMA_BLOCK, permuted_qk=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, **_QK_NORM}),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_BLOCK, norm_offset=1.0),
}


@dataclass(frozen=True)
class Step:
    """One output tensor: read `gguf`, undo llama.cpp's changes, write it as `hf`."""

    gguf: str
    hf: str
    heads: int | None = None   # un-permute the rows of this many heads (Llama q/k)
    offset: float = 0.0        # subtract this, in float32 (Gemma norms)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Its converter regroups each head's rows from Hugging
    Face's rotate-half order (first halves, then second halves) into interleaved pairs, because
    llama.cpp's rope rotates adjacent elements; Hugging Face's rope needs the halves back."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def family_of(md: dict[str, Any], path: Path) -> tuple[str, Family]:
    arch = md.get("general.architecture")
    if arch not in FAMILIES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (supported: "
                              f"{', '.join(FAMILIES)}); convert it with a tool that knows it")
    return arch, FAMILIES[arch]


def hf_config(md: dict[str, Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """config.json for a GGUF file; CheckpointError for what the Hugging Face class cannot represent."""
    arch, fam = family_of(md, path)

    def get(key: str, default: Any = ...) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is ...:
            raise CheckpointError(f"{path}: metadata {arch}.{key} is missing; the GGUF file is incomplete")
        if isinstance(value, list):
            raise CheckpointError(f"{path}: per-layer {arch}.{key} is not a uniform {fam.model_type} layout; "
                                  f"not supported")
        return value

    if get("expert_count", 0):
        raise CheckpointError(f"{path}: Mixture-of-Experts GGUF files are not supported; convert a dense model")
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: Llama 3.1-style rope scaling (rope_freqs) is not supported yet; "
                              f"use the Hugging Face checkpoint of this model")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: key and value head sizes differ; not a {fam.model_type} layout")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings are not a {fam.model_type} layout; not supported")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor; the GGUF file is incomplete")
    ids = special_token_ids(md) if "tokenizer.ggml.tokens" in md else {}
    layers = int(get("block_count"))
    cfg: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": fam.model_type, "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": int(embed.shape[0]), "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(get, path),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        **{f"{role}_token_id": i for role, i in ids.items() if role in ("bos", "eos", "pad")},
    }
    if fam.model_type in ("llama", "mistral"):
        cfg.update(hidden_act="silu", mlp_bias=False)
        if fam.model_type == "mistral":
            cfg["sliding_window"] = get("attention.sliding_window", None)
    elif fam.model_type in ("qwen2", "qwen3"):
        # llama.cpp never uses Qwen's sliding window (the HF configs leave it off too)
        cfg.update(hidden_act="silu", use_sliding_window=False, sliding_window=None, max_window_layers=layers)
        if fam.model_type == "qwen2":
            del cfg["attention_bias"]  # Qwen2 always has q/k/v biases and never an o_proj bias
    else:
        cfg.update(_gemma3(get, cfg, layers))
    return cfg


def _rope_scaling(get: Any, path: Path) -> dict[str, Any] | None:
    """Linear rope scaling carries over (Gemma 3 4B+ uses it on its global layers); others are refused."""
    kind, factor = get("rope.scaling.type", None), get("rope.scaling.factor", None)
    if kind is None and get("rope.scale_linear", None) is not None:  # files from before rope.scaling.*
        kind, factor = "linear", get("rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise CheckpointError(f"{path}: rope scaling {kind!r} is not supported yet; use the Hugging Face "
                          f"checkpoint of this model")


def _gemma3(get: Any, cfg: dict[str, Any], layers: int) -> dict[str, Any]:
    """Gemma 3's fields a GGUF does not store, as llama.cpp's loader hard-codes them: with a sliding window,
    every 6th layer is global and the local layers' rope base is 10000 (without one, all layers are global);
    queries scale by head_dim, except the 62-layer 27B's by hidden/heads. Embeddings are stored unscaled:
    both llama.cpp and transformers multiply them by sqrt(hidden) at run time."""
    window = get("attention.sliding_window", None) or None
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else cfg["head_dim"],
        "sliding_window": window,
        "layer_types": ["sliding_attention" if window and i % 6 < 5 else "full_attention" for i in range(layers)],
        "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": get("final_logit_softcapping", None),
        "attn_logit_softcapping": None, "use_bidirectional_attention": False,
    }


def tensor_plan(tensors: dict[str, Any], cfg: dict[str, Any], md: dict[str, Any], path: Path) -> list[Step]:
    """One Step per tensor of the file, in file order; CheckpointError for a stray or missing tensor."""
    _, fam = family_of(md, path)
    if fam.model_type == "qwen2":  # q/k/v biases always, never on o_proj
        biases: tuple[str, ...] = _QKV_BIAS
    else:  # attention_bias: all four projections, as transformers' classes read it
        biases = _QKV_BIAS + ("attn_output",) if cfg.get("attention_bias") else ()
    out = []
    for name in tensors:
        base, _, suffix = name.rpartition(".")
        m = _BLOCK_RE.fullmatch(name)
        if base in _GLOBAL and suffix == "weight":
            hf = f"{_GLOBAL[base]}.weight"
            out.append(Step(name, hf, offset=fam.norm_offset if base == "output_norm" else 0.0))
        elif (m and m.group(2) in fam.block and int(m.group(1)) < cfg["num_hidden_layers"]
              and (m.group(3) == "weight" or m.group(2) in biases)):
            layer, key, kind = m.groups()
            heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}.get(key)
            norm = key.endswith("norm") and kind == "weight"
            out.append(Step(name, f"model.layers.{layer}.{fam.block[key]}.{kind}",
                            heads=heads if fam.permuted_qk else None, offset=fam.norm_offset if norm else 0.0))
        else:
            raise CheckpointError(f"{path}: tensor {name!r} has no place in a {fam.architecture} checkpoint; "
                                  f"this GGUF is not a plain {fam.model_type} model")
    names = {s.hf for s in out}
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        need += [f"model.layers.{i}.{v}.weight" for v in fam.block.values()]
        need += [f"model.layers.{i}.{fam.block[k]}.bias" for k in biases]
    missing = [n for n in need if n not in names]
    if missing:
        raise CheckpointError(f"{path}: no tensor for {missing[0]} ({len(missing)} missing); the GGUF file is "
                              f"incomplete")
    return out


def apply(step: Step, t: torch.Tensor) -> torch.Tensor:
    """The Hugging Face tensor from the dequantized float32 one."""
    if step.heads:
        t = unpermute_rotary(t, step.heads)
    return t - step.offset if step.offset else t
