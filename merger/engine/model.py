"""The engine's decoder-only transformer (Llama, Mistral, Mixtral, Qwen2-MoE), read top-down:
load_model -> Transformer -> Block -> Attention / FeedForward / MoEFeedForward -> helpers.

Built on the meta device, then the checkpoint's tensors are assigned in (no second copy).
"""
# Shapes: B = batch, T = tokens, S = key positions, H = heads, K = kv heads, Dh = head dim, D = hidden, V = vocab
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merger.engine import native
from merger.engine.config import ModelConfig, load_model_config, rope_inv_freq
from merger.engine.matmul import linear, slow_half
from merger.engine.moe import FeedForward, MoEFeedForward
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
    except RuntimeError as e:  # shape mismatches surface from torch as RuntimeError
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not match config.json ({detail}); "
                              "fix the config or re-save the checkpoint") from None
    model.init_rope(torch.device(device))
    if torch.device(device).type == "cpu":
        native.gemv_kernel(dtype)  # a first-ever run compiles the native kernels here, not in a timed prefill
    return model.eval()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)  # [V, D]
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # tied checkpoints get the embedding tensor itself assigned here (see weights.py)
        self.output = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)  # [V, D]
        self.cache: list[KVCache] | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def init_rope(self, device: torch.device, length: int = 4096) -> None:
        """cos/sin tables [P, Dh] in float32 (a plain attribute, not state); regrown on demand so a
        128k-context config does not cost 128k rows up front."""
        length = min(max(length, 1), self.config.max_position_embeddings)
        pos = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(pos, rope_inv_freq(self.config))   # [P, Dh/2]
        emb = torch.cat([freqs, freqs], dim=-1).to(device)      # [P, Dh]: rotate-half layout
        self.rope = (emb.cos(), emb.sin())

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Preallocate every layer's K/V for `max_len` positions (prompt + new tokens)."""
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise ContextError(f"{max_len} positions exceed the model's context "
                               f"(max_position_embeddings {cfg.max_position_embeddings} in config.json)")
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        # bf16 K/V are exact in float32, and one-query attention over a float32 cache runs 3-8x faster
        # on CPUs without native bf16 (measured: 80-2000 keys, AVX2); the cost is 2x the cache memory
        dtype = torch.float32 if slow_half(self.dtype, self.device) else self.dtype
        self.cache = [KVCache(shape, dtype, self.device) for _ in self.layers]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int | None = None, last_only: bool = False,
                record: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> float32 logits [B, T, V] ([B, 1, V] if last_only).

        start_pos None: a stand-alone causal pass from position 0 (no cache). An int: the tokens sit at
        positions start_pos.. and read/extend the cache made by setup_cache.
        """
        bsz, n = input_ids.shape
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
        if self.rope is None or self.rope[0].shape[0] < start + n:
            self.init_rope(self.device, 2 * (start + n))
        cos, sin = rope_slice(self.rope, start, n, self.dtype)       # [T, 1, Dh] each
        masks = _masks(self.config.sliding_windows, start, n, input_ids.device)
        x = F.embedding(input_ids, self.embed)                        # [B, T, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start, masks, None if cache is None else cache[i], record)
        if last_only:
            x = x[:, -1:]
        return linear(self.norm(x), self.output, out_dtype=torch.float32)  # [B, T, V]

    def layer_states(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids [1, T] -> {"layer_input", "mlp_input"}: float32 [L, T, D] each.

        layer_input[i]: the hidden state entering layer i (i = 0: the embedding output, before any norm).
        mlp_input[i]: layer i's post-attention RMSNorm output, what its MLP / router sees.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"layer_states takes input_ids of shape [1, T], got {tuple(input_ids.shape)}")
        record: dict[str, list[torch.Tensor]] = {"layer_input": [], "mlp_input": []}
        self.forward(input_ids, last_only=True, record=record)
        return {k: torch.stack([t[0] for t in v]) for k, v in record.items()}


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, cfg.sliding_windows[index])
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe_layers[index]:
            self.ffn: nn.Module = MoEFeedForward(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k,
                cfg.norm_topk_prob, cfg.shared_expert_intermediate_size)
        else:
            self.ffn = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                masks: dict[int | None, torch.Tensor | None], cache: KVCache | None,
                record: dict[str, list[torch.Tensor]] | None) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        h = x + self.attn(self.attn_norm(x), cos, sin, start, masks, cache)
        normed = self.ffn_norm(h)
        if record is not None:
            record["layer_input"].append(x.float())
            record["mlp_input"].append(normed.float())
        return h + self.ffn(normed)


class Attention(nn.Module):
    """Grouped-query attention with q/k/v fused into one projection, RoPE, optional sliding window."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
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
        qk = apply_rope(qkv[:, :, :self.n_heads + self.n_kv], cos, sin)       # q and k in one go
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
        kernel = native.attend_kernel(k.dtype) if n == 1 and cache is not None and k.device.type == "cpu" else None
        if kernel is not None:  # decode, one query per head: 1.2-3.8x as fast as SDPA (200-8000 keys)
            o = native.attend(q[:, :, 0], k, v, hd ** -0.5, kernel)                 # float32 [B, H, Dh]
            return linear(o.view(bsz, 1, self.n_heads * hd).to(x.dtype), self.wo, self.bo)
        causal = mask is None and n > 1
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=hd ** -0.5, enable_gqa=self.n_heads != self.n_kv)
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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = native.rmsnorm_kernel(x.dtype) if x.device.type == "cpu" else None
        if kernel is not None and x.dtype == self.weight.dtype:
            return native.rmsnorm(x, self.weight, self.eps, kernel)  # the same math in one call
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in float32, round to the model dtype, then scale: the order transformers uses
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_slice(table: tuple[torch.Tensor, torch.Tensor], start: int, n: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for positions start..start+n, [T, 1, Dh] in `dtype`, made once per forward."""
    cos, sin = (t[start:start + n].to(dtype) for t in table)
    half = sin.shape[-1] // 2
    # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the negation moves onto the table
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [B, T, heads, Dh], cos / folded sin [T, 1, Dh] (see rope_slice)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin


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
