"""The batch-1 decode step as one native call (cpu_step.c `step`): every layer and the logits of one token.

Built once per KV cache: a table of pointers per layer (weights, biases as float32, norms, the cache) that the
kernel replays for every token, as llama.cpp replays a prebuilt graph. Per token, Python only checks the
position and token, picks the RoPE row and makes the logits tensor; per-op dispatch, the thread pool's start
per op and torch's small-tensor work are gone (SmolLM2-135M bf16, 2-core EPYC: see the kernel's header).
Models with a piece the kernel lacks (Gemma's norms and soft-caps, partial RoPE, a shared expert) keep the
per-op path; `unsupported` names the reason.
"""
from __future__ import annotations

import ctypes

import torch

from merger.engine import calibrate, native

_PTRS = ("wqkv", "wo", "w13", "w2", "router", "bqkv", "bo", "b13", "b2", "attn_norm", "ffn_norm", "q_norm",
         "k_norm", "k", "v")
MAX_EXPERTS = 64  # the kernel's routing buffers


class _Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in _PTRS] + [(n, ctypes.c_long) for n in ("ffn", "window", "p_qkv", "p_o",
                                                                                     "p_13", "p_2")]


class _Model(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_long) for n in ("dim", "heads", "kv_heads", "head_dim", "experts", "top_k", "layers",
                                               "vocab", "max_len", "ffn_buf")]
                + [("side_from", ctypes.c_long), ("normalize", ctypes.c_int), ("eps", ctypes.c_float),
                   ("scale", ctypes.c_float)]
                + [(n, ctypes.c_void_p) for n in ("embed", "norm", "output")]
                + [("p_out", ctypes.c_long), ("layer", ctypes.c_void_p)])


def unsupported(model, batch: int) -> str | None:
    """Why the decode step cannot run this model (None: it can)."""
    cfg = model.config
    if model.device.type != "cpu" or batch != 1:
        return "batch 1 on the CPU only"
    if native.step_kernel(model.dtype) is None:
        return native.status()
    if (cfg.norm_plus_one or cfg.sandwich_norms or cfg.embed_scale is not None or cfg.attn_softcap is not None
            or cfg.final_softcap is not None or cfg.local_rope is not None):
        return f"{cfg.model_type}: norms, scales or soft-caps the step kernel lacks"
    if cfg.hidden_act != "silu":
        return f"activation {cfg.hidden_act}"
    if model.ropes["global"].tables[0][0].shape[-1] != cfg.head_dim:
        return "partial rotary embedding"
    for layer in model.layers:
        ffn = layer.ffn
        if hasattr(ffn, "router") and (ffn.shared is not None or ffn.w13.shape[0] > MAX_EXPERTS):
            return "a shared expert or more than 64 experts"
        if any(not p.is_contiguous() or p.dtype != model.dtype for p in layer.parameters()):
            return "weights that are not contiguous in the model dtype"
    return None


class DecodeStep:
    """logits = step(token, pos): float32 [1, 1, V] for one token at `pos`, its K/V written into the cache."""

    def __init__(self, model, cache):
        cfg = model.config
        self.kernel = native.step_kernel(model.dtype)
        self.rope = model.ropes["global"]
        self.vocab, self.max_len = cfg.vocab_size, cache[0].k.shape[2]
        self._keep: list[torch.Tensor] = []  # float32 biases: alive as long as the tables point at them
        layers = (_Layer * len(model.layers))()
        ffn_buf = 0
        for entry, layer, kv in zip(layers, model.layers, cache):
            attn, ffn = layer.attn, layer.ffn
            moe = hasattr(ffn, "router")
            width = ffn.w13.shape[-2] // 2  # plain [(E,) 2F, D] or in panels [(E,) D / P, 2F, P]
            ffn_buf = max(ffn_buf, width * (cfg.top_k if moe else 1))
            ptrs = {"wqkv": attn.wqkv, "wo": attn.wo, "w13": ffn.w13, "w2": ffn.w2,
                    "router": ffn.router if moe else None, "bqkv": self._f32(attn.bqkv), "bo": self._f32(attn.bo),
                    "b13": None if moe else self._f32(ffn.b13), "b2": None if moe else self._f32(ffn.b2),
                    "attn_norm": layer.attn_norm.weight, "ffn_norm": layer.ffn_norm.weight,
                    "q_norm": attn.q_norm.weight if attn.q_norm is not None else None,
                    "k_norm": attn.k_norm.weight if attn.k_norm is not None else None, "k": kv.k, "v": kv.v}
            for name, t in ptrs.items():
                setattr(entry, name, None if t is None else t.data_ptr())
            entry.ffn, entry.window = width, attn.window or 0
            # a weight's last dimension is its panel width P (panels.py), or its K when plain: pdots takes both
            entry.p_qkv, entry.p_o = attn.wqkv.shape[-1], attn.wo.shape[-1]
            entry.p_13, entry.p_2 = ffn.w13.shape[-1], ffn.w2.shape[-1]
        self._layers = layers
        self._model = _Model(dim=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, experts=cfg.num_experts if cfg.is_moe else 0,
                             top_k=cfg.top_k if cfg.is_moe else 1, layers=len(model.layers), vocab=cfg.vocab_size,
                             max_len=self.max_len, ffn_buf=ffn_buf,
                             side_from=int(calibrate.choice(model.dtype, "side_from")),
                             normalize=int(bool(cfg.norm_topk_prob)),
                             eps=cfg.rms_norm_eps, scale=model.layers[0].attn.scale, embed=model.embed.data_ptr(),
                             norm=model.norm.weight.data_ptr(), output=model.output.data_ptr(),
                             p_out=model.output.shape[-1],
                             layer=ctypes.cast(layers, ctypes.c_void_p))
        self._model_ref = ctypes.byref(self._model)
        self._tensors = (model.embed, model.output, [kv.k for kv in cache], [kv.v for kv in cache])

    def _f32(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        self._keep.append(t.float().contiguous())
        return self._keep[-1]

    def fits(self, token: int, pos: int) -> bool:
        """Whether the kernel can take this token at this position (else the per-op path raises the error)."""
        return 0 <= pos < self.max_len and 0 <= token < self.vocab

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        cos, sin = self.rope.get(pos, 1, torch.float32)  # the table's own row (float32 already)
        logits = torch.empty(1, 1, self.vocab, dtype=torch.float32)
        if self.kernel(self._model_ref, token, pos, cos.data_ptr(), sin.data_ptr(), logits.data_ptr(),
                       torch.get_num_threads()):
            raise MemoryError("native decode step: no memory for its buffers")
        return logits
