"""Rotary position embeddings: config.json's RoPE fields (both transformers styles, Gemma 3's local/global
pair, Phi-3's partial rotary and su/longrope), the inverse frequencies of each scaling type (linear, llama3,
longrope, as transformers' modeling_rope_utils computes them) and the cos/sin tables the model slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from merger.engine.fields import bad, get_dict, get_float, get_int
from merger.errors import CheckpointError

KINDS = ("default", "linear", "llama3", "longrope")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class Rope:
    """One RoPE: base `theta`, `scaling` (None or a dict with `rope_type`), rotating the first `dim` dims."""

    theta: float
    scaling: dict[str, Any] | None
    dim: int

    @property
    def switch(self) -> int | None:
        """longrope: a forward reaching past this many positions takes the long factors; None otherwise."""
        s = self.scaling
        return s["original_max_position_embeddings"] if s is not None and s["rope_type"] == "longrope" else None


def parse_rope(cfg: dict[str, Any], where: str, model_type: str, max_positions: int,
               head_dim: int) -> tuple[Rope, Rope | None]:
    """(RoPE of full-attention layers, RoPE of sliding-window layers or None when it is the same one).

    Read from `rope_parameters` (transformers 5; Gemma 3 nests one per layer type there) or from
    `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`)."""
    params = get_dict(cfg, "rope_parameters", where)
    dim = _rotary_dim(cfg, params, where, model_type, head_dim)
    if params and all(isinstance(v, dict) or v is None for v in params.values()):  # one entry per layer type
        if model_type != "gemma3_text" or not set(params) <= set(_LAYER_TYPES):
            raise CheckpointError(f"{where}: per-layer-type rope_parameters are read for gemma3_text only (keys "
                                  f"{', '.join(_LAYER_TYPES)}), not for {model_type!r}; write one rope_parameters "
                                  "object")
        ropes = []
        for kind in _LAYER_TYPES:
            sub = get_dict(params, kind, where)
            theta = get_float(sub, "rope_theta", where, 1e6 if kind == "full_attention" else 1e4,
                              f"rope_parameters.{kind}.")
            ropes.append(Rope(theta, _scaling(sub, f"rope_parameters.{kind}.", cfg, where, max_positions, model_type,
                                              dim), dim))
        return ropes[0], ropes[1]
    label = "rope_parameters." if params else "rope_scaling."
    raw = {**get_dict(cfg, "rope_scaling", where), **{k: v for k, v in params.items() if k != "rope_theta"}}
    default_theta = 1e6 if model_type == "gemma3_text" else 10000.0  # transformers' defaults
    theta = (get_float(params, "rope_theta", where, default_theta, label) if "rope_theta" in params
             else get_float(cfg, "rope_theta", where, default_theta))
    full = Rope(theta, _scaling(raw, label, cfg, where, max_positions, model_type, dim), dim)
    if model_type != "gemma3_text":
        return full, None
    # Gemma 3 before transformers 5: rope_scaling (and rope_theta) belong to the global layers only
    return full, Rope(get_float(cfg, "rope_local_base_freq", where, 10000.0), None, dim)


def _rotary_dim(cfg: dict[str, Any], params: dict[str, Any], where: str, model_type: str, head_dim: int) -> int:
    """Phi-3 (and Phi-4-mini, model_type phi3) may rotate only the first partial_rotary_factor of each head."""
    if model_type != "phi3":
        return head_dim  # transformers' other families ignore the field
    key = "partial_rotary_factor"
    src, label = (params, "rope_parameters.") if key in params else (cfg, "")
    factor = get_float(src, key, where, 1.0, label)
    dim = int(head_dim * factor)
    if factor > 1 or dim < 2 or dim % 2:
        raise bad(where, label + key, f"at most 1, giving an even number of rotated dims of head_dim {head_dim}",
                  src[key])
    return dim


def _scaling(raw: dict[str, Any], label: str, cfg: dict[str, Any], where: str, max_positions: int,
             model_type: str, dim: int) -> dict[str, Any] | None:
    kind = raw.get("rope_type", raw.get("type", "default"))
    if not isinstance(kind, str):
        raise bad(where, label + "rope_type", "a string such as 'linear' or 'llama3'", kind)
    if model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # transformers' Phi-3 reads both as longrope
    if kind == "default":
        return None
    if kind not in KINDS:
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported by the engine "
                              f"(supported: {', '.join(KINDS)})")
    if kind == "longrope":
        return _longrope(raw, label, cfg, where, max_positions, dim)
    scaling: dict[str, Any] = {"rope_type": kind, "factor": get_float(raw, "factor", where, label=label)}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            scaling[key] = get_float(raw, key, where, label=label)
        scaling["original_max_position_embeddings"] = get_int(
            raw, "original_max_position_embeddings", where, 1, max_positions, label)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise bad(where, label + "high_freq_factor", f"greater than low_freq_factor "
                      f"{scaling['low_freq_factor']}", scaling["high_freq_factor"])
    return scaling


def _longrope(raw: dict[str, Any], label: str, cfg: dict[str, Any], where: str, max_positions: int,
              dim: int) -> dict[str, Any]:
    # Phi-3 keeps the pretraining context at the top level, and transformers gives that one priority
    key = "original_max_position_embeddings"
    original = (get_int(cfg, key, where, 1) if cfg.get(key) is not None
                else get_int(raw, key, where, 1, max_positions, label))
    factor = get_float(raw, "factor", where, max_positions / original, label)
    attention = get_float(raw, "attention_factor", where, None, label)
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    scaling: dict[str, Any] = {"rope_type": "longrope", "original_max_position_embeddings": original,
                               "attention_factor": attention}
    for key in ("short_factor", "long_factor"):
        value = raw.get(key)
        if value is None:
            raise CheckpointError(f"{where}: field {label + key!r} is missing; the engine needs it to build the model")
        if (not isinstance(value, list) or len(value) != dim // 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value)):
            raise bad(where, label + key, f"a list of {dim // 2} numbers > 0 (rotary dims / 2)", value)
        scaling[key] = [float(v) for v in value]
    return scaling


def inv_freq(rope: Rope, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2] float32, attention factor cos and sin are multiplied by)."""
    d, s = rope.dim, rope.scaling
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    if s is not None and s["rope_type"] == "longrope":
        ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (ext * rope.theta ** exponent), s["attention_factor"]
    inv = 1.0 / (rope.theta ** exponent)
    if s is None:
        return inv, 1.0
    if s["rope_type"] == "linear":
        return inv / float(s["factor"]), 1.0
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between blended
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled), 1.0


class RopeTable:
    """cos and sign-folded sin [P, dim] in float32, the attention factor applied, for one Rope; grown on demand
    so a 128k-context config does not cost 128k rows up front. longrope keeps a second table, taken by every
    forward that reaches past original_max_position_embeddings (transformers' rule, decode steps included)."""

    def __init__(self, rope: Rope, max_positions: int, device: torch.device, length: int = 4096):
        self.freqs = [inv_freq(rope)]
        self.switch = rope.switch
        if self.switch is not None:
            self.freqs.append(inv_freq(rope, long=True))
        self.max_positions, self.device = max_positions, device
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.grow(length)

    @property
    def length(self) -> int:
        return self.tables[0][0].shape[0]

    def grow(self, length: int) -> None:
        length = min(max(length, 1), self.max_positions)
        pos = torch.arange(length, dtype=torch.float32)
        self.tables = []
        for inv, factor in self.freqs:
            freqs = torch.outer(pos, inv)                           # [P, dim/2]
            emb = torch.cat([freqs, freqs], dim=-1)                 # [P, dim]: rotate-half layout
            cos, sin = emb.cos() * factor, emb.sin() * factor
            half = inv.shape[0]
            # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the negation moves onto the table
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self.tables.append((cos.to(self.device), sin.to(self.device)))

    def get(self, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and folded sin for positions start..start+n as [T, 1, dim] in `dtype`."""
        if self.length < start + n:
            self.grow(2 * (start + n))
        cos, sin = self.tables[1 if self.switch is not None and start + n > self.switch else 0]
        return cos[start:start + n].to(dtype)[:, None], sin[start:start + n].to(dtype)[:, None]
