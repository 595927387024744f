"""config.json keys that list or count layers, rewritten for an output stacked from layer ranges (a
`slices:` frankenmerge): per-layer lists (`layer_types`) are taken entry by entry from each slice's
source, `mlp_only_layers` is renumbered, and the rules that derive a layer's kind from its index
(Qwen2's `max_window_layers`, Gemma 3's `sliding_window_pattern`) become an explicit `layer_types`,
since the indices move."""
from __future__ import annotations

from typing import Any

from merger.errors import warn


def _kind(cfg: dict[str, Any], i: int) -> str | None:
    """The attention kind transformers derives for layer i of a config without `layer_types`."""
    if isinstance(cfg.get("sliding_window_pattern"), int) and cfg["sliding_window_pattern"] > 0:
        return "full_attention" if (i + 1) % cfg["sliding_window_pattern"] == 0 else "sliding_attention"
    if cfg.get("use_sliding_window") and isinstance(cfg.get("max_window_layers"), int):
        return "full_attention" if i < cfg["max_window_layers"] else "sliding_attention"
    return None


def layer_updates(config: dict[str, Any], sources: list[tuple[dict[str, Any], int, int]]) -> dict[str, Any]:
    """Updates for `config` (the output's donor) when output layer j comes from layer a + (j - offset) of a
    source config, for each (source config, a, b) range in output order."""
    n_out = sum(b - a for _, a, b in sources)
    out: dict[str, Any] = {}
    n = config.get("num_hidden_layers")
    for key, value in config.items():
        if key == "mlp_only_layers" or not isinstance(value, list) or len(value) != n or not n:
            continue
        merged = []
        for cfg, a, b in sources:
            own = cfg.get(key)
            merged += (own if isinstance(own, list) and len(own) == cfg.get("num_hidden_layers") else value)[a:b]
        out[key] = merged
    if "layer_types" not in out:
        kinds = [_kind(cfg, i) for cfg, a, b in sources for i in range(a, b)]
        if any(k is not None for k in kinds):
            out["layer_types"] = [k or "full_attention" for k in kinds]
            if "max_window_layers" in config:
                out["max_window_layers"] = n_out  # layer_types now says it; keep the old rule out of the way
    if isinstance(config.get("mlp_only_layers"), list):
        only, j = [], 0
        for cfg, a, b in sources:
            theirs = set(cfg.get("mlp_only_layers") or [])
            only += [j + i - a for i in range(a, b) if i in theirs]
            j += b - a
        out["mlp_only_layers"] = only
    if isinstance(config.get("decoder_sparse_step"), int) and config["decoder_sparse_step"] > 1:
        warn("decoder_sparse_step > 1: which layers are sparse follows the output's layer numbers, not the "
             "sources'; check the stacked layers' experts")
    return out
