"""The engine's view of a checkpoint's config.json: one dataclass for every family it runs (Llama, Mistral,
Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3). What differs between families is a
handful of fields here (biases, norms, activation, scales, soft-caps, window pattern), not copies of the model.

Both config styles are read: transformers < 5 (`rope_theta` + `rope_scaling`) and transformers >= 5
(`rope_parameters`). Anything the engine cannot run faithfully is a CheckpointError naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merger.engine.fields import bad, get_bool, get_cap, get_float, get_int, get_str, token_ids
from merger.engine.rope import Rope, inv_freq, parse_rope
from merger.errors import CheckpointError
from merger.io.dtypes import parse_dtype

__all__ = ["ModelConfig", "SUPPORTED", "load_model_config", "parse_config", "rope_inv_freq", "token_ids"]

# model_type -> the architecture name transformers writes for it
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_ARCH_TO_TYPE = {v: k for k, v in SUPPORTED.items()}
_HINTS = {"gemma3": "; that is the multimodal Gemma 3: the engine runs text-only Gemma3ForCausalLM checkpoints "
                    "(model_type gemma3_text)"}
GEMMA = ("gemma2", "gemma3_text")
QWEN = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: Rope
    local_rope: Rope | None = None    # sliding-window layers' own RoPE (Gemma 3: rope_local_base_freq)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"          # the MLP's gate activation: silu, or gelu_pytorch_tanh (Gemma)
    norm_plus_one: bool = False       # Gemma: every RMSNorm scales by (1 + weight), in float32
    qk_norm: bool = False             # Qwen3, Gemma 3: an RMSNorm over each head of q and k, before RoPE
    sandwich_norms: bool = False      # Gemma 2/3: attention and MLP outputs are normed too, before the residual
    fused_weights: bool = False       # Phi-3: the checkpoint stores qkv_proj and gate_up_proj already fused
    embed_scale: float | None = None  # Gemma: embeddings x sqrt(hidden_size), the factor rounded to the dtype
    attn_scale: float = 0.0           # scores = q.k * attn_scale: head_dim**-0.5, or query_pre_attn_scalar's
    attn_softcap: float | None = None   # Gemma 2: scores = cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)
    # one entry per layer: the window (keys kv_idx > q_idx - window are visible) or None
    sliding_windows: list[int | None] = field(default_factory=list)
    # MoE: moe_layers[i] is True where layer i has routed experts (others keep a dense MLP)
    num_experts: int = 0
    top_k: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: list[bool] = field(default_factory=list)
    torch_dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies [rotary dims / 2] float32 of the global (or local) RoPE, scaling applied."""
    return inv_freq(cfg.local_rope if local and cfg.local_rope else cfg.rope)[0]


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_windows(cfg: dict[str, Any], where: str, model_type: str, n_layers: int) -> list[int | None]:
    """Each layer's window, by the rule transformers applies to the family when layer_types is absent."""
    if "sliding_window" not in cfg:  # absent: the config class's default (null means no window)
        window = 4096 if model_type in GEMMA or model_type == "mistral" else None
    else:  # Qwen2-MoE writes 0 when it is off
        window = get_int(cfg, "sliding_window", where, 0, 0) or None
    if window is None and model_type in GEMMA:
        window = get_int(cfg, "max_position_embeddings", where, 1, 4096)  # unbounded, on its local RoPE still
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != n_layers
                              or not all(isinstance(t, str) and t in _LAYER_TYPES for t in types)):
        raise bad(where, "layer_types", f"a list of {n_layers} entries (num_hidden_layers), each "
                  f"{' or '.join(map(repr, _LAYER_TYPES))}", types)
    use_sliding = get_bool(cfg, "use_sliding_window", where, False)
    max_win = get_int(cfg, "max_window_layers", where, 0, 28) if model_type in QWEN else 0
    if model_type == "llama" or window is None or (model_type in QWEN and not use_sliding):
        return [None] * n_layers
    if model_type == "qwen3_moe":  # every layer, whatever layer_types says
        return [window] * n_layers
    if types is None:
        if model_type == "qwen2_moe":
            sliding = [bool((i + 1) % 2) and i < max_win for i in range(n_layers)]
        elif model_type in ("qwen2", "qwen3"):
            sliding = [i >= max_win for i in range(n_layers)]
        elif model_type in GEMMA:  # Gemma 2 alternates; Gemma 3 has one global layer every `pattern`
            pattern = 2 if model_type == "gemma2" else get_int(
                cfg, "sliding_window_pattern", where, 1, get_int(cfg, "_sliding_window_pattern", where, 1, 6))
            sliding = [bool((i + 1) % pattern) for i in range(n_layers)]
        else:
            sliding = [True] * n_layers
        types = ["sliding_attention" if s else "full_attention" for s in sliding]
    return [window if t == "sliding_attention" else None for t in types]


def _model_type(cfg: dict[str, Any], where: str) -> str:
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type is not None and not isinstance(model_type, str):
        raise bad(where, "model_type", "a string such as 'llama'", model_type)
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise bad(where, "architectures", "a list of class names such as ['LlamaForCausalLM']", archs)
    if model_type not in SUPPORTED and archs and archs[0] in _ARCH_TO_TYPE:
        model_type = _ARCH_TO_TYPE[archs[0]]
    if model_type not in SUPPORTED:
        name = model_type or (archs[0] if archs else "none given")
        raise CheckpointError(
            f"{where}: architecture {name!r} (model_type/architectures) is not supported by the engine"
            f"{_HINTS.get(name, '')}; supported: {', '.join(SUPPORTED.values())}")
    return model_type


def parse_config(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Validate a config.json dict and turn it into a ModelConfig. Every field read is checked for type and
    range; a bad one is a one-line CheckpointError naming it. Absent (or null) optional fields take defaults."""
    model_type = _model_type(cfg, where)
    gemma = model_type in GEMMA
    # transformers' Gemma classes read hidden_activation and ignore hidden_act
    act = get_str(cfg, "hidden_activation" if gemma else "hidden_act", where,
                  "gelu_pytorch_tanh" if gemma else "silu", ACTIVATIONS)
    hidden = get_int(cfg, "hidden_size", where, 1)
    heads = get_int(cfg, "num_attention_heads", where, 1)
    n_layers = get_int(cfg, "num_hidden_layers", where, 1)
    kv_heads = get_int(cfg, "num_key_value_heads", where, 1, heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads}; fix one of them")
    if cfg.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                              "set head_dim or fix one of them")
    head_dim = get_int(cfg, "head_dim", where, 1, hidden // heads)  # Mistral-Nemo: != hidden / heads
    if head_dim % 2:
        raise bad(where, "head_dim", "even (RoPE rotates the two halves of each head)", head_dim)
    max_positions = get_int(cfg, "max_position_embeddings", where, 1, 4096)
    rope, local_rope = parse_rope(cfg, where, model_type, max_positions, head_dim)
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    try:
        dtype = parse_dtype(dtype_name)
    except ValueError:
        dtype = torch.float32  # float64 or exotic: the user can still pass --dtype
    mc = ModelConfig(
        model_type=model_type,
        vocab_size=get_int(cfg, "vocab_size", where, 1),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=get_int(cfg, "intermediate_size", where, 1),
        rms_norm_eps=get_float(cfg, "rms_norm_eps", where, 1e-6),
        max_position_embeddings=max_positions,
        rope=rope,
        local_rope=local_rope,
        tie_word_embeddings=get_bool(cfg, "tie_word_embeddings", where, gemma),  # Gemma's classes default to tied
        hidden_act=act,
        attn_scale=head_dim ** -0.5,
        sliding_windows=_sliding_windows(cfg, where, model_type, n_layers),
        moe_layers=[False] * n_layers,
        torch_dtype=dtype,
        bos_token_id=get_int(cfg, "bos_token_id", where, 0, None),
        eos_token_ids=token_ids(cfg.get("eos_token_id"), "eos_token_id", where),
    )
    _family(mc, cfg, where)
    if mc.is_moe and act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported by the engine for MoE experts (only silu)")
    if mc.is_moe and not 1 <= mc.top_k <= mc.num_experts:
        raise CheckpointError(f"{where}: num_experts_per_tok {mc.top_k} must be between 1 and {mc.num_experts}")
    return mc


def _family(mc: ModelConfig, cfg: dict[str, Any], where: str) -> None:
    """The fields that differ between families, each from the config keys its transformers class reads."""
    t = mc.model_type
    attention_bias = get_bool(cfg, "attention_bias", where, False)
    if t in ("llama", "mistral"):
        mc.qkv_bias = mc.o_bias = attention_bias
        mc.mlp_bias = get_bool(cfg, "mlp_bias", where, False)
    elif t == "qwen2":
        mc.qkv_bias = True  # transformers' Qwen2 always has q/k/v biases and never an o_proj bias
    elif t == "qwen2_moe":
        mc.qkv_bias = get_bool(cfg, "qkv_bias", where, True)
    elif t in ("qwen3", "qwen3_moe") or t in GEMMA:
        mc.qkv_bias = mc.o_bias = attention_bias
    mc.qk_norm = t in ("qwen3", "qwen3_moe", "gemma3_text")
    mc.fused_weights = t == "phi3"
    if t in GEMMA:
        if get_bool(cfg, "use_bidirectional_attention", where, False):
            raise CheckpointError(f"{where}: use_bidirectional_attention is true: that is an encoder, not a causal "
                                  "LM the engine can generate with; set it to false or null")
        mc.norm_plus_one = mc.sandwich_norms = True
        mc.embed_scale = mc.hidden_size ** 0.5
        mc.attn_scale = get_float(cfg, "query_pre_attn_scalar", where, 256.0) ** -0.5
        gemma2 = t == "gemma2"  # transformers' defaults: Gemma 2 caps at 50 / 30, Gemma 3 not at all
        mc.final_softcap = get_cap(cfg, "final_logit_softcapping", where, 30.0 if gemma2 else None)
        # transformers' Gemma 3 attention never applies attn_logit_softcapping, whatever the config says
        mc.attn_softcap = get_cap(cfg, "attn_logit_softcapping", where, 50.0) if gemma2 else None
    if t == "mixtral":
        mc.num_experts = get_int(cfg, "num_local_experts", where, 1)
        mc.top_k = get_int(cfg, "num_experts_per_tok", where, 1)
        mc.moe_intermediate_size = mc.intermediate_size
        mc.moe_layers = [True] * mc.num_layers
    elif t in ("qwen2_moe", "qwen3_moe"):
        # transformers 5 saves Qwen3-MoE's expert count as num_local_experts, earlier versions as num_experts
        key = "num_local_experts" if t == "qwen3_moe" and cfg.get("num_experts") is None else "num_experts"
        mc.num_experts = get_int(cfg, key, where, 0)
        mc.top_k = get_int(cfg, "num_experts_per_tok", where, 1)
        mc.norm_topk_prob = get_bool(cfg, "norm_topk_prob", where, False)
        mc.moe_intermediate_size = get_int(cfg, "moe_intermediate_size", where, 1)
        if t == "qwen2_moe":  # Qwen3-MoE has no shared expert
            mc.shared_expert_intermediate_size = get_int(cfg, "shared_expert_intermediate_size", where, 0, 0)
        step = get_int(cfg, "decoder_sparse_step", where, 1, 1)
        dense = cfg.get("mlp_only_layers")
        dense = [] if dense is None else dense
        n = mc.num_layers
        if not isinstance(dense, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in dense):
            raise bad(where, "mlp_only_layers", f"a list of layer indices in 0..{n - 1}", dense)
        mc.moe_layers = [i not in dense and mc.num_experts > 0 and (i + 1) % step == 0 for i in range(n)]


def load_model_config(path: str | Path) -> tuple[dict[str, Any], ModelConfig]:
    """Read `path/config.json` into (raw dict, ModelConfig); CheckpointError when absent or unsupported."""
    from merger.io.checkpoint import load_config

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist; pass a folder holding config.json")
    raw = load_config(path, str(path))
    return raw, parse_config(raw, str(path / "config.json"))
