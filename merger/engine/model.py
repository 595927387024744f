"""The engine's decoder-only transformer, read top-down:
load_model -> Transformer -> Block -> Attention / FeedForward / MoEFeedForward -> helpers.

One model for every family config.py parses (Llama, Mistral, Mixtral, Qwen2/2.5, Qwen2-MoE, Qwen3, Qwen3-MoE,
Gemma 2/3, Phi-3): their differences are ModelConfig fields that switch on a few named pieces here (q/k
norms, Gemma's (1 + w) and sandwich norms, embedding scale, soft-capping, per-layer-type RoPE).
Built on the meta device, then the checkpoint's tensors are assigned in (no second copy).
"""
# Shapes: B = batch, T = tokens, S = key positions, H = heads, K = kv heads, Dh = head dim, D = hidden, V = vocab
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merger.engine import calibrate, native, step
from merger.engine.config import ModelConfig, load_model_config
from merger.engine.matmul import linear, slow_half
from merger.engine.moe import FeedForward, MoEFeedForward
from merger.engine.rope import RopeTable
from merger.errors import CheckpointError, MergerError


class EngineError(MergerError):
    """The engine cannot run this request as asked (dtype, device)."""


class ContextError(EngineError):
    """The input does not fit the model's context (max_position_embeddings) or the KV cache."""


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Transformer:
    """Load a checkpoint folder (config.json + safetensors, sharded or not) for inference.

    dtype None keeps the checkpoint's torch_dtype; device is "cpu" or "cuda[:n]".
    """
    from merger.engine.weights import read_state_dict

    path = Path(path)
    _, cfg = load_model_config(path)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    dtype = dtype or cfg.torch_dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise EngineError(f"dtype {dtype} is not supported by the engine; use float32, bfloat16 or float16")
    try:
        # weights first: they are checked against config.json before a model of its size is built
        state = read_state_dict(path, cfg, dtype, torch.device(device))
        with torch.device("meta"):
            model = Transformer(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        del state  # the model holds the weights now (panels.apply frees each plain one as it goes)
    except RuntimeError as e:  # shape mismatches surface from torch as RuntimeError
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not match config.json ({detail}); "
                              "fix the config or re-save the checkpoint") from None
    model.init_rope(torch.device(device))
    if torch.device(device).type == "cpu":
        # a first-ever run compiles the native kernels and measures which to use here, not in a timed prefill
        calibrate.choices()
    return model.eval()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)  # [V, D]
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        # tied checkpoints get the embedding tensor itself assigned here (see weights.py)
        self.output = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)  # [V, D]
        self.cache: list[KVCache] | None = None
        self.ropes: dict[str, RopeTable] = {}

    @property
    def cache(self) -> list[KVCache] | None:
        return self._cache

    @cache.setter
    def cache(self, value: list[KVCache] | None) -> None:
        self._cache = value
        self.step: step.DecodeStep | None = None  # it points into the cache: made again by setup_cache

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def init_rope(self, device: torch.device, length: int = 4096) -> None:
        """The RoPE tables (plain attributes, not state, regrown on demand): "global", and "local" for the
        sliding-window layers of a model that gives them their own base (Gemma 3)."""
        cfg = self.config
        self.ropes = {"global": RopeTable(cfg.rope, cfg.max_position_embeddings, device, length)}
        if cfg.local_rope is not None:
            self.ropes["local"] = RopeTable(cfg.local_rope, cfg.max_position_embeddings, device, length)

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Preallocate every layer's K/V for `max_len` positions (prompt + new tokens)."""
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise ContextError(f"{max_len} positions exceed the model's context "
                               f"(max_position_embeddings {cfg.max_position_embeddings} in config.json)")
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        # the native attention reads a bf16/fp16 cache as it is; without it, torch's one-query attention over
        # a float32 cache runs 3-8x faster on CPUs without fast half math (measured: 80-2000 keys, AVX2),
        # and bf16 K/V are exact in float32 (at 2x the cache memory)
        # (Gemma 2's soft-capped attention is torch's, over a float32 cache where half math is slow)
        native_attend = (self.device.type == "cpu" and self.config.attn_softcap is None
                         and native.attend_kernel(self.dtype) is not None)
        dtype = torch.float32 if slow_half(self.dtype, self.device) and not native_attend else self.dtype
        self.cache = [KVCache(shape, dtype, self.device) for _ in self.layers]
        if step.unsupported(self, batch) is None:
            self.step = step.DecodeStep(self, self.cache)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int | None = None, last_only: bool = False,
                record: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> float32 logits [B, T, V] ([B, 1, V] if last_only).

        start_pos None: a stand-alone causal pass from position 0 (no cache). An int: the tokens sit at
        positions start_pos.. and read/extend the cache made by setup_cache.
        """
        bsz, n = input_ids.shape
        if self.step is not None and n == 1 and bsz == 1 and start_pos is not None and record is None:
            token = int(input_ids[0, 0])
            if self.step.fits(token, start_pos):  # one native call for the whole token (step.py)
                return self.step(token, start_pos)
        cache = None if start_pos is None else self.cache
        start = start_pos or 0
        if start_pos is not None:
            if cache is None:
                raise RuntimeError("forward(start_pos=...) needs setup_cache() first")
            if start + n > cache[0].k.shape[2] or cache[0].k.shape[0] != bsz:
                raise ContextError(f"positions {start}..{start + n - 1} (batch {bsz}) do not fit the KV cache "
                                   f"{tuple(cache[0].k.shape)}; call setup_cache with a larger max_len")
        if start + n > self.config.max_position_embeddings:
            raise ContextError(f"{start + n} tokens exceed the model's context "
                               f"(max_position_embeddings {self.config.max_position_embeddings} in config.json)")
        if not self.ropes:
            self.init_rope(self.device, 2 * (start + n))
        ropes = {kind: table.get(start, n, self.dtype) for kind, table in self.ropes.items()}  # [T, 1, R] cos, sin
        masks = _masks(self.config.sliding_windows, start, n, input_ids.device)
        x = F.embedding(input_ids, self.embed)                        # [B, T, D]
        if self.config.embed_scale is not None:
            # Gemma: the factor is rounded to the model dtype first, as transformers does (sqrt(3072) is 55.5 in bf16)
            x = x * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, ropes, start, masks, None if cache is None else cache[i], record)
        if last_only:
            x = x[:, -1:]
        logits = linear(self.norm(x), self.output, out_dtype=torch.float32)  # [B, T, V]
        return logits if self.config.final_softcap is None else softcap(logits, self.config.final_softcap)

    def layer_states(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids [1, T] -> {"layer_input", "mlp_input"}: float32 [L, T, D] each.

        layer_input[i]: the hidden state entering layer i (i = 0: the (scaled) embedding output, before any norm).
        mlp_input[i]: what layer i's MLP / router sees: its post-attention RMSNorm output (Gemma: the
        pre-feedforward norm's).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"layer_states takes input_ids of shape [1, T], got {tuple(input_ids.shape)}")
        record: dict[str, list[torch.Tensor]] = {"layer_input": [], "mlp_input": []}
        self.forward(input_ids, last_only=True, record=record)
        return {k: torch.stack([t[0] for t in v]) for k, v in record.items()}


class Block(nn.Module):
    """Pre-norm decoder layer: h = x + attn(norm(x)), then h + ffn(norm(h)). With sandwich norms (Gemma 2/3)
    each output is normed once more before it joins the residual stream."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        window = cfg.sliding_windows[index]
        self.rope = "local" if window is not None and cfg.local_rope is not None else "global"
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.attn = Attention(cfg, window)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.attn_out_norm = self.ffn_out_norm = None
        if cfg.sandwich_norms:
            self.attn_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.ffn_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        if cfg.moe_layers[index]:
            self.ffn: nn.Module = MoEFeedForward(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k,
                cfg.norm_topk_prob, cfg.shared_expert_intermediate_size)
        else:
            self.ffn = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.hidden_act)

    def forward(self, x: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]], start: int,
                masks: dict[int | None, torch.Tensor | None], cache: KVCache | None,
                record: dict[str, list[torch.Tensor]] | None) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        a = self.attn(self.attn_norm(x), *ropes[self.rope], start, masks, cache)
        h = x + (a if self.attn_out_norm is None else self.attn_out_norm(a))
        normed = self.ffn_norm(h)
        if record is not None:
            record["layer_input"].append(x.float())
            record["mlp_input"].append(normed.float())
        f = self.ffn(normed)
        return h + (f if self.ffn_out_norm is None else self.ffn_out_norm(f))


class Attention(nn.Module):
    """Grouped-query attention with q/k/v fused into one projection, RoPE, optional sliding window; optional
    per-head q/k RMSNorm before RoPE (Qwen3, Gemma 3) and soft-capped scores (Gemma 2)."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window, self.scale, self.softcap = window, cfg.attn_scale, cfg.attn_softcap
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.wqkv = nn.Parameter(torch.empty(qkv, cfg.hidden_size), requires_grad=False)
        self.bqkv = nn.Parameter(torch.empty(qkv), requires_grad=False) if cfg.qkv_bias else None
        self.wo = nn.Parameter(torch.empty(cfg.hidden_size, cfg.num_heads * cfg.head_dim), requires_grad=False)
        self.bo = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False) if cfg.o_bias else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                masks: dict[int | None, torch.Tensor | None], cache: KVCache | None) -> torch.Tensor:
        bsz, n, _ = x.shape
        hd = self.head_dim
        qkv = linear(x, self.wqkv, self.bqkv).view(bsz, n, -1, hd)              # [B, T, H+2K, Dh]
        qk = qkv[:, :, :self.n_heads + self.n_kv]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :self.n_heads]), self.k_norm(qk[:, :, self.n_heads:])], dim=2)
        qk = apply_rope(qk, cos, sin)                                           # q and k in one go
        q = qk[:, :, :self.n_heads].transpose(1, 2)                             # [B, H, T, Dh]
        k = qk[:, :, self.n_heads:].transpose(1, 2)                             # [B, K, T, Dh]
        v = qkv[:, :, self.n_heads + self.n_kv:].transpose(1, 2)                # [B, K, T, Dh]
        if cache is not None:
            k, v = cache.update(start, k, v)                                    # [B, K, S, Dh], S = start+T
            q = q.to(k.dtype)  # float32 when the cache is (see setup_cache)
        mask = masks.get(self.window)
        if n == 1 and self.window is not None and k.shape[2] > self.window:
            # one query: the window is just the last `window` keys, no mask needed
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
        causal = mask is None and n > 1
        if self.softcap is not None:  # SDPA and the native kernel have no soft-capping
            o = softcapped_attention(q, k, v, mask, causal, self.scale, self.softcap)
            return linear(o.transpose(1, 2).reshape(bsz, n, self.n_heads * hd).to(x.dtype), self.wo, self.bo)
        kernel = native.attend_kernel(k.dtype) if n == 1 and cache is not None and k.device.type == "cpu" else None
        if kernel is not None:  # decode, one query per head: 1.2-3.8x as fast as SDPA (200-8000 keys)
            o = native.attend(q[:, :, 0], k, v, self.scale, kernel)                 # float32 [B, H, Dh]
            return linear(o.view(bsz, 1, self.n_heads * hd).to(x.dtype), self.wo, self.bo)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=self.scale, enable_gqa=self.n_heads != self.n_kv)
        o = o.transpose(1, 2).reshape(bsz, n, self.n_heads * hd).to(x.dtype)    # [B, T, H*Dh]
        return linear(o, self.wo, self.bo)


class KVCache:
    """Preallocated keys and values of one layer: [B, K, max_len, Dh] each."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, scaled by weight (Llama's rounding order) or by 1 + weight (Gemma's)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plus_one:
            # transformers' Gemma RMSNorm: normalise and scale by (1 + w) all in float32, then round once. A
            # (1 + w) in bf16 would lose w's low bits, so this path stays off the native (same-dtype) kernel.
            return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).to(x.dtype)
        kernel = native.rmsnorm_kernel(x.dtype) if x.device.type == "cpu" else None
        if kernel is not None and x.dtype == self.weight.dtype:
            return native.rmsnorm(x, self.weight, self.eps, kernel)  # the same math in one call
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in float32, round to the model dtype, then scale: the order transformers uses
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first R dims of each head (all of them unless the model rotates only part,
    like Phi-4-mini): x [B, T, heads, Dh], cos / folded sin [T, 1, R] (see RopeTable.get)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    half = rot // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): Gemma 2's bound on attention scores and final logits."""
    return torch.tanh(x / cap) * cap


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         causal: bool, scale: float, cap: float) -> torch.Tensor:
    """softmax(softcap(scale q.k) + mask) v in float32, in transformers' eager order: q [B, H, T, Dh], k and
    v [B, K, S, Dh], mask [T, S] (True = may attend) -> float32 [B, H, T, Dh]."""
    bsz, heads, n, hd = q.shape
    kv, keys = k.shape[1], k.shape[2]
    qg = q.float().view(bsz, kv, heads // kv, n, hd)                       # [B, K, G, T, Dh]: G heads per kv head
    scores = softcap(qg @ k.float()[:, :, None].transpose(-1, -2) * scale, cap)  # [B, K, G, T, S]
    if mask is None and causal:  # only a stand-alone pass from position 0 gets here, so S == T
        mask = torch.ones(n, keys, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()[:, :, None]             # [B, K, G, T, Dh]
    return out.view(bsz, heads, n, hd)


def _masks(windows: list[int | None], start: int, n: int,
           device: torch.device) -> dict[int | None, torch.Tensor | None]:
    """Boolean masks [T, S] (True = may attend) per distinct window; None where SDPA needs none."""
    if n == 1:  # a single query sees every cached key (sliding windows slice the keys instead)
        return dict.fromkeys(windows)
    out: dict[int | None, torch.Tensor | None] = {}
    q_pos = torch.arange(start, start + n, device=device)[:, None]   # [T, 1]
    k_pos = torch.arange(start + n, device=device)[None, :]          # [1, S]
    for w in set(windows):
        if start == 0 and (w is None or w >= n):
            out[w] = None  # plain causal: SDPA's is_causal
            continue
        allowed = k_pos <= q_pos
        if w is not None:
            allowed &= k_pos > q_pos - w
        out[w] = allowed
    return out
