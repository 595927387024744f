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


_REQUIRED = object()  # the default of a field config.json must hold


def _bad(where: str, key: str, want: str, value: Any) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{where}: {key} must be {want}, got {shown}; fix that field")


def _get(cfg: dict[str, Any], key: str, where: str, default: Any, label: str) -> Any:
    """cfg[key], None when absent or null (transformers writes null for unset fields); CheckpointError when
    the field is required."""
    value = cfg.get(key)
    if value is None and default is _REQUIRED:
        raise CheckpointError(f"{where}: field {label + key!r} is missing; the engine needs it to build the model")
    return value


def _int(cfg: dict[str, Any], key: str, where: str, minimum: int = 0, default: Any = _REQUIRED,
         label: str = "") -> Any:
    """An integer >= minimum (4.0 counts, True and 4.5 do not), or `default` when absent."""
    value = _get(cfg, key, where, default, label)
    if value is None:
        return default
    return _as_int(value, label + key, where, minimum)


def _as_int(value: Any, key: str, where: str, minimum: int) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    # bool is an int subclass: `true` where a count belongs is a corrupt config, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(where, key, f"an integer >= {minimum}", value)
    return value


def _float(cfg: dict[str, Any], key: str, where: str, default: Any = _REQUIRED, label: str = "") -> Any:
    """A finite number > 0, or `default` when absent."""
    value = _get(cfg, key, where, default, label)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad(where, label + key, "a finite number > 0", value)
    return float(value)


def _bool(cfg: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(where, key, "true or false", value)
    return value


def _dict(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(where, key, "an object (or null)", value)
    return value


def token_ids(value: Any, key: str, where: str) -> list[int]:
    """A config's token id or list of them (eos_token_id may be either) as a list; [] for None."""
    if value is None:
        return []
    return [_as_int(v, key, where, 0) for v in (value if isinstance(value, list) else [value])]


def _rope(cfg: dict[str, Any], where: str, max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = _dict(cfg, "rope_parameters", where)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{where}: per-layer-type `rope_parameters` are not supported by the engine")
    label = "rope_parameters." if params else "rope_scaling."
    raw = {**_dict(cfg, "rope_scaling", where), **{k: v for k, v in params.items() if k != "rope_theta"}}
    theta = (_float(params, "rope_theta", where, 10000.0, label) if "rope_theta" in params
             else _float(cfg, "rope_theta", where, 10000.0))
    kind = raw.get("rope_type", raw.get("type", "default"))
    if not isinstance(kind, str):
        raise _bad(where, label + "rope_type", "a string such as 'linear' or 'llama3'", kind)
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise CheckpointError(
            f"{where}: rope type {kind!r} is not supported by the engine (supported: default, linear, llama3)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _float(raw, "factor", where, label=label)}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            scaling[key] = _float(raw, key, where, label=label)
        scaling["original_max_position_embeddings"] = _int(
            raw, "original_max_position_embeddings", where, 1, max_positions, label)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise _bad(where, label + "high_freq_factor", f"greater than low_freq_factor "
                       f"{scaling['low_freq_factor']}", scaling["high_freq_factor"])
    return theta, scaling


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_windows(cfg: dict[str, Any], where: str, model_type: str, n_layers: int) -> list[int | None]:
    window = _int(cfg, "sliding_window", where, 0, 0) or None  # Qwen2-MoE writes 0 when it is off
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != n_layers
                              or not all(isinstance(t, str) and t in _LAYER_TYPES for t in types)):
        raise _bad(where, "layer_types", f"a list of {n_layers} entries (num_hidden_layers), each "
                   f"{' or '.join(map(repr, _LAYER_TYPES))}", types)
    use_sliding = _bool(cfg, "use_sliding_window", where, False)
    if model_type == "llama" or window is None:
        return [None] * n_layers
    if model_type == "qwen2_moe" and not use_sliding:
        return [None] * n_layers
    if types is None and model_type == "qwen2_moe":
        # transformers' rule for Qwen2-MoE configs written without layer_types
        max_win = _int(cfg, "max_window_layers", where, 0, 28)
        types = ["sliding_attention" if (i + 1) % 2 and i < max_win else "full_attention" for i in range(n_layers)]
    if types is None:
        return [window] * n_layers
    return [window if t == "sliding_attention" else None for t in types]


def _model_type(cfg: dict[str, Any], where: str) -> str:
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type is not None and not isinstance(model_type, str):
        raise _bad(where, "model_type", "a string such as 'llama'", model_type)
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise _bad(where, "architectures", "a list of class names such as ['LlamaForCausalLM']", archs)
    if model_type not in SUPPORTED and archs and archs[0] in _ARCH_TO_TYPE:
        model_type = _ARCH_TO_TYPE[archs[0]]
    if model_type not in SUPPORTED:
        name = model_type or (archs[0] if archs else "none given")
        raise CheckpointError(
            f"{where}: architecture {name!r} (model_type/architectures) is not supported by the engine; "
            f"supported: {', '.join(SUPPORTED.values())}")
    return model_type


def parse_config(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Validate a config.json dict and turn it into a ModelConfig. Every field read is checked for type and
    range; a bad one is a one-line CheckpointError naming it. Absent (or null) optional fields take defaults."""
    model_type = _model_type(cfg, where)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported by the engine (only silu)")
    hidden = _int(cfg, "hidden_size", where, 1)
    heads = _int(cfg, "num_attention_heads", where, 1)
    n_layers = _int(cfg, "num_hidden_layers", where, 1)
    kv_heads = _int(cfg, "num_key_value_heads", where, 1, heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads}; fix one of them")
    if cfg.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                              "set head_dim or fix one of them")
    head_dim = _int(cfg, "head_dim", where, 1, hidden // heads)
    if head_dim % 2:
        raise _bad(where, "head_dim", "even (RoPE rotates the two halves of each head)", head_dim)
    max_positions = _int(cfg, "max_position_embeddings", where, 1, 4096)
    theta, scaling = _rope(cfg, where, max_positions)
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    try:
        dtype = parse_dtype(dtype_name)
    except ValueError:
        dtype = torch.float32  # float64 or exotic: the user can still pass --dtype
    mc = ModelConfig(
        model_type=model_type,
        vocab_size=_int(cfg, "vocab_size", where, 1),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_int(cfg, "intermediate_size", where, 1),
        rms_norm_eps=_float(cfg, "rms_norm_eps", where, 1e-6),
        max_position_embeddings=max_positions,
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", where, False),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_windows=_sliding_windows(cfg, where, model_type, n_layers),
        torch_dtype=dtype,
        bos_token_id=_int(cfg, "bos_token_id", where, 0, None),
        eos_token_ids=token_ids(cfg.get("eos_token_id"), "eos_token_id", where),
    )
    if model_type in ("llama", "mistral"):
        mc.qkv_bias = mc.o_bias = _bool(cfg, "attention_bias", where, False)
        mc.mlp_bias = _bool(cfg, "mlp_bias", where, False)
        mc.moe_layers = [False] * n_layers
    elif model_type == "mixtral":
        mc.num_experts = _int(cfg, "num_local_experts", where, 1)
        mc.top_k = _int(cfg, "num_experts_per_tok", where, 1)
        mc.moe_intermediate_size = mc.intermediate_size
        mc.moe_layers = [True] * n_layers
    else:  # qwen2_moe
        mc.qkv_bias = _bool(cfg, "qkv_bias", where, True)
        mc.num_experts = _int(cfg, "num_experts", where, 0)
        mc.top_k = _int(cfg, "num_experts_per_tok", where, 1)
        mc.norm_topk_prob = _bool(cfg, "norm_topk_prob", where, False)
        mc.moe_intermediate_size = _int(cfg, "moe_intermediate_size", where, 1)
        mc.shared_expert_intermediate_size = _int(cfg, "shared_expert_intermediate_size", where, 0, 0)
        step = _int(cfg, "decoder_sparse_step", where, 1, 1)
        dense = cfg.get("mlp_only_layers")
        dense = [] if dense is None else dense
        if not isinstance(dense, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in dense):
            raise _bad(where, "mlp_only_layers", f"a list of layer indices in 0..{n_layers - 1}", dense)
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
