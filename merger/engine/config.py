"""The engine's view of a checkpoint's config.json: one dataclass for Llama, Mistral, Mixtral, Qwen2-MoE.

Both config styles are read: transformers < 5 (`rope_theta` + `rope_scaling`) and transformers >= 5
(`rope_parameters`). Anything the engine cannot run faithfully is a CheckpointError naming the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merger.errors import CheckpointError
from merger.io.dtypes import parse_dtype

# model_type -> the architecture name transformers writes for it
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
_ARCH_TO_TYPE = {v: k for k, v in SUPPORTED.items()}


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
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
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


def _need(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise CheckpointError(f"{where}: field {key!r} is missing; the engine needs it to build the model")
    return cfg[key]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = cfg.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{where}: per-layer-type `rope_parameters` are not supported by the engine")
    scaling = dict(cfg.get("rope_scaling") or {})
    scaling.update({k: v for k, v in params.items() if k != "rope_theta"})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "llama3"):
        raise CheckpointError(
            f"{where}: rope type {kind!r} is not supported by the engine (supported: default, linear, llama3)")
    scaling["rope_type"] = kind
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _need(scaling, key, f"{where} rope scaling")
    else:
        _need(scaling, "factor", f"{where} rope scaling")
    return float(theta), scaling


def _sliding_windows(cfg: dict[str, Any], model_type: str, n_layers: int) -> list[int | None]:
    window = cfg.get("sliding_window") or None  # Qwen2-MoE writes 0 when it is off
    if model_type == "llama" or window is None:
        return [None] * n_layers
    if model_type == "qwen2_moe" and not cfg.get("use_sliding_window", False):
        return [None] * n_layers
    types = cfg.get("layer_types")
    if types is None and model_type == "qwen2_moe":
        # transformers' rule for Qwen2-MoE configs written without layer_types
        max_win = int(cfg.get("max_window_layers", 28))
        types = ["sliding_attention" if (i + 1) % 2 and i < max_win else "full_attention" for i in range(n_layers)]
    if types is None:
        return [int(window)] * n_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def parse_config(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Validate a config.json dict and turn it into a ModelConfig; CheckpointError names the bad field."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in SUPPORTED and archs and archs[0] in _ARCH_TO_TYPE:
        model_type = _ARCH_TO_TYPE[archs[0]]
    if model_type not in SUPPORTED:
        name = model_type or (archs[0] if archs else "none given")
        raise CheckpointError(
            f"{where}: architecture {name!r} (model_type/architectures) is not supported by the engine; "
            f"supported: {', '.join(SUPPORTED.values())}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported by the engine (only silu)")
    hidden = int(_need(cfg, "hidden_size", where))
    heads = int(_need(cfg, "num_attention_heads", where))
    n_layers = int(_need(cfg, "num_hidden_layers", where))
    theta, scaling = _rope(cfg, where)
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    try:
        dtype = parse_dtype(dtype_name)
    except ValueError:
        dtype = torch.float32  # float64 or exotic: the user can still pass --dtype
    mc = ModelConfig(
        model_type=model_type,
        vocab_size=int(_need(cfg, "vocab_size", where)),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(_need(cfg, "intermediate_size", where)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_windows=_sliding_windows(cfg, model_type, n_layers),
        torch_dtype=dtype,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_ids(cfg.get("eos_token_id")),
    )
    if mc.num_heads % mc.num_kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
    if model_type in ("llama", "mistral"):
        mc.qkv_bias = mc.o_bias = bool(cfg.get("attention_bias", False))
        mc.mlp_bias = bool(cfg.get("mlp_bias", False))
        mc.moe_layers = [False] * n_layers
    elif model_type == "mixtral":
        mc.num_experts = int(_need(cfg, "num_local_experts", where))
        mc.top_k = int(_need(cfg, "num_experts_per_tok", where))
        mc.moe_intermediate_size = mc.intermediate_size
        mc.moe_layers = [True] * n_layers
    else:  # qwen2_moe
        mc.qkv_bias = bool(cfg.get("qkv_bias", True))
        mc.num_experts = int(_need(cfg, "num_experts", where))
        mc.top_k = int(_need(cfg, "num_experts_per_tok", where))
        mc.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))
        mc.moe_intermediate_size = int(_need(cfg, "moe_intermediate_size", where))
        mc.shared_expert_intermediate_size = int(cfg.get("shared_expert_intermediate_size") or 0)
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        mc.moe_layers = [i not in dense and mc.num_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]
    if mc.is_moe and not 1 <= mc.top_k <= mc.num_experts:
        raise CheckpointError(f"{where}: num_experts_per_tok {mc.top_k} must be between 1 and {mc.num_experts}")
    return mc


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], float32, with linear or llama3 scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between blended
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def load_model_config(path: str | Path) -> tuple[dict[str, Any], ModelConfig]:
    """Read `path/config.json` into (raw dict, ModelConfig); CheckpointError when absent or unsupported."""
    from merger.io.checkpoint import load_config

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist; pass a folder holding config.json")
    raw = load_config(path, str(path))
    return raw, parse_config(raw, str(path / "config.json"))
