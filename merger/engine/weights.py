"""Checkpoint tensor names (Hugging Face layout) -> the engine's fused state dict.

q/k/v become one `wqkv`, gate/up one `w13` (Phi-3 stores both fused already: qkv_proj and gate_up_proj, in
the same row order, taken as they are); Gemma's four norms per layer map onto attn_norm / attn_out_norm /
ffn_norm / ffn_out_norm (ffn_norm is always the one the MLP input goes through); experts (Mixtral
`block_sparse_moe.experts.{j}.w1|w2|w3`, Qwen2-MoE / Qwen3-MoE `mlp.experts.{j}.gate_proj|up_proj|down_proj`,
or transformers 5's already-stacked `mlp.experts.gate_up_proj` / `down_proj`) are stacked into [E, 2F, D]
and [E, D, F] at load.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import re
from pathlib import Path

import torch

from merger.engine.config import ModelConfig
from merger.errors import CheckpointError
from merger.io.checkpoint import Checkpoint


HUGE_PAGE = 2 << 20  # x86-64 transparent huge page
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# buffers older transformers saved beside the weights; the engine computes RoPE itself
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


@functools.cache
def huge_pages() -> bool:
    """Whether big weights go to transparent huge pages: Linux with THP not `never`, MERGER_HUGEPAGES not 0."""
    if os.environ.get("MERGER_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def _goes_huge(nbytes: int, device: torch.device) -> bool:
    return device.type == "cpu" and nbytes >= HUGE_PAGE and huge_pages()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, except that a CPU tensor of 2 MiB or more lives in memory advised onto transparent huge
    pages, 2 MiB-aligned: decode streams every weight once per token, and with 4 KiB pages the read stalls at
    each page (measured on a 2-core EPYC: gemv 18.7 -> 20.7 GB/s, mean of 15 alternating runs)."""
    numel = math.prod(shape)
    if not _goes_huge(numel * dtype.itemsize, device):
        return torch.empty(shape, dtype=dtype, device=device)
    # private anonymous memory (shared memory follows another THP setting); unmapped with its last tensor
    buf = mmap.mmap(-1, numel * dtype.itemsize + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).view(shape)


class _Reader:
    """Reads checkpoint tensors converted to the target dtype/device, with a clear error when absent.
    On the meta device it reads nothing: shapes come from the headers, and `used` collects the names."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.ckpt, self.cfg, self.dtype, self.device = ckpt, cfg, dtype, device
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return self.ckpt.has(name)

    def _read(self, name: str) -> torch.Tensor:
        if not self.ckpt.has(name):
            m = _LAYER.match(name)
            if m and not any(n.startswith(m[0]) for n in self.ckpt.names):
                raise CheckpointError(
                    f"{self.ckpt.path}: config.json says {self.cfg.num_layers} layers but the weights have no "
                    f"layer {m[1]} ({name} is missing); config.json and the weights disagree: fix num_hidden_layers")
            raise CheckpointError(
                f"{self.ckpt.path}: tensor {name!r} is missing; the weights do not match config.json "
                f"(model_type {self.cfg.model_type!r}); re-save the checkpoint or fix its config")
        self.used.add(name)
        if self.device.type == "meta":
            return torch.empty(self.ckpt.shape(name), dtype=self.dtype, device=self.device)
        return self.ckpt.get(name).to(device=self.device, dtype=self.dtype)

    def _cat(self, names: list[str]) -> torch.Tensor:
        return torch.cat([self._read(n) for n in names], dim=0)

    def _placed(self, t: torch.Tensor) -> torch.Tensor:
        """t itself, or moved onto huge pages (see `empty`) when it is big enough to gain from them."""
        return empty(tuple(t.shape), t.dtype, t.device).copy_(t) if _goes_huge(t.nbytes, t.device) else t

    def get(self, name: str) -> torch.Tensor:
        return self._placed(self._read(name))

    def cat(self, names: list[str]) -> torch.Tensor:
        return self._placed(self._cat(names))

    def stack_into(self, shape: tuple[int, ...], parts: list[list[str]]) -> torch.Tensor:
        """out[j] = cat(parts[j]): filled expert by expert so only one expert is ever held twice."""
        out = empty(shape, self.dtype, self.device)
        for j, names in enumerate(parts):
            out[j] = self._cat(names)
        return out


def read_state_dict(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor the Transformer needs, named as its parameters, read lazily from `path`.

    Before any tensor data is read, the names are checked against config.json: a missing tensor, or one the
    model would not use (a layer beyond num_hidden_layers, a bias the config turns off), is a CheckpointError.
    """
    ckpt = Checkpoint(path)
    try:
        names_only = _Reader(ckpt, cfg, dtype, torch.device("meta"))
        _assemble(names_only, cfg)
        _check_unused(ckpt, cfg, names_only.used)
        return _assemble(_Reader(ckpt, cfg, dtype, device), cfg)
    finally:
        ckpt.close()


def _check_unused(ckpt: Checkpoint, cfg: ModelConfig, used: set[str]) -> None:
    """Every stored tensor must be one the model reads: anything else means config.json describes another model."""
    for name in ckpt.names:
        if name in used or _IGNORED.fullmatch(name):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: lm_head *is* the embedding, even if a stale copy was saved
        m = _LAYER.match(name)
        if m and int(m[1]) >= cfg.num_layers:
            top = max(int(k[1]) for n in ckpt.names if (k := _LAYER.match(n)))
            raise CheckpointError(f"{ckpt.path}: config.json says {cfg.num_layers} layers but the weights hold "
                                  f"layer {m[1]} ({name}); config.json and the weights disagree: fix "
                                  f"num_hidden_layers (they hold layers up to {top})")
        raise CheckpointError(f"{ckpt.path}: tensor {name!r} is not used by the {cfg.model_type} model config.json "
                              "describes; config.json and the weights disagree: fix config.json (layer count, "
                              "biases, experts) or re-save the checkpoint")


def _assemble(r: _Reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {"embed": r.get("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        sd[o + "attn_norm.weight"] = r.get(p + "input_layernorm.weight")
        if cfg.sandwich_norms:  # Gemma: post_attention_layernorm norms the attention output
            sd[o + "attn_out_norm.weight"] = r.get(p + "post_attention_layernorm.weight")
            sd[o + "ffn_norm.weight"] = r.get(p + "pre_feedforward_layernorm.weight")
            sd[o + "ffn_out_norm.weight"] = r.get(p + "post_feedforward_layernorm.weight")
        else:
            sd[o + "ffn_norm.weight"] = r.get(p + "post_attention_layernorm.weight")
        if cfg.fused_weights:
            sd[o + "attn.wqkv"] = r.get(a + "qkv_proj.weight")
        else:
            sd[o + "attn.wqkv"] = r.cat([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"])
        if cfg.qk_norm:
            sd[o + "attn.q_norm.weight"] = r.get(a + "q_norm.weight")
            sd[o + "attn.k_norm.weight"] = r.get(a + "k_norm.weight")
        if cfg.qkv_bias:
            sd[o + "attn.bqkv"] = r.cat([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"])
        sd[o + "attn.wo"] = r.get(a + "o_proj.weight")
        if cfg.o_bias:
            sd[o + "attn.bo"] = r.get(a + "o_proj.bias")
        if cfg.moe_layers[i]:
            sd.update(_moe(r, cfg, p, o + "ffn."))
        elif cfg.fused_weights:
            sd[o + "ffn.w13"] = r.get(p + "mlp.gate_up_proj.weight")
            sd[o + "ffn.w2"] = r.get(p + "mlp.down_proj.weight")
        else:
            sd.update(_dense(r, p + "mlp.", o + "ffn.", cfg.mlp_bias))
    sd["norm.weight"] = r.get("model.norm.weight")
    # tie_word_embeddings means lm_head *is* the embedding, even if a stale lm_head was saved
    sd["output"] = sd["embed"] if cfg.tie_word_embeddings else r.get("lm_head.weight")
    return sd


def _dense(r: _Reader, src: str, dst: str, bias: bool) -> dict[str, torch.Tensor]:
    sd = {dst + "w13": r.cat([src + "gate_proj.weight", src + "up_proj.weight"]),
          dst + "w2": r.get(src + "down_proj.weight")}
    if bias:
        sd[dst + "b13"] = r.cat([src + "gate_proj.bias", src + "up_proj.bias"])
        sd[dst + "b2"] = r.get(src + "down_proj.bias")
    return sd


def _moe(r: _Reader, cfg: ModelConfig, p: str, dst: str) -> dict[str, torch.Tensor]:
    n_exp, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    # Mixtral checkpoints say block_sparse_moe; transformers 5 (and Qwen2-MoE) say mlp
    block = p + ("block_sparse_moe." if r.has(p + "block_sparse_moe.gate.weight") else "mlp.")
    ex = block + "experts."
    sd = {dst + "router": r.get(block + "gate.weight")}
    if r.has(ex + "gate_up_proj"):  # already stacked: [E, 2F, D] and [E, D, F]
        sd[dst + "w13"], sd[dst + "w2"] = r.get(ex + "gate_up_proj"), r.get(ex + "down_proj")
    elif r.has(ex + "0.w1.weight"):  # Mixtral: w1 = gate, w3 = up, w2 = down
        sd[dst + "w13"] = r.stack_into((n_exp, 2 * f, d), [[f"{ex}{j}.w1.weight", f"{ex}{j}.w3.weight"]
                                                           for j in range(n_exp)])
        sd[dst + "w2"] = r.stack_into((n_exp, d, f), [[f"{ex}{j}.w2.weight"] for j in range(n_exp)])
    else:
        sd[dst + "w13"] = r.stack_into((n_exp, 2 * f, d), [[f"{ex}{j}.gate_proj.weight", f"{ex}{j}.up_proj.weight"]
                                                           for j in range(n_exp)])
        sd[dst + "w2"] = r.stack_into((n_exp, d, f), [[f"{ex}{j}.down_proj.weight"] for j in range(n_exp)])
    for name in ("w13", "w2"):
        want = (n_exp, 2 * f, d) if name == "w13" else (n_exp, d, f)
        if tuple(sd[dst + name].shape) != want:
            raise CheckpointError(f"{r.ckpt.path}: experts of {block!r} have shape {tuple(sd[dst + name].shape)}, "
                                  f"config.json implies {want}; fix num_experts / moe_intermediate_size")
    if cfg.shared_expert_intermediate_size:
        sd.update(_dense(r, block + "shared_expert.", dst + "shared.", False))
        sd[dst + "shared_gate"] = r.get(block + "shared_expert_gate.weight")
    return sd
