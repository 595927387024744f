"""Typed readers of config.json values: each returns the value (or its default when the field is absent or
null) or raises a one-line CheckpointError naming the field and what it must be.

Shared by config.py (the model's shape and family) and rope.py (the RoPE parameters).
"""
from __future__ import annotations

import math
from typing import Any

from merger.errors import CheckpointError

REQUIRED = object()  # the default of a field config.json must hold


def bad(where: str, key: str, want: str, value: Any) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{where}: {key} must be {want}, got {shown}; fix that field")


def _get(cfg: dict[str, Any], key: str, where: str, default: Any, label: str) -> Any:
    """cfg[key], None when absent or null (transformers writes null for unset fields); CheckpointError when
    the field is required."""
    value = cfg.get(key)
    if value is None and default is REQUIRED:
        raise CheckpointError(f"{where}: field {label + key!r} is missing; the engine needs it to build the model")
    return value


def get_int(cfg: dict[str, Any], key: str, where: str, minimum: int = 0, default: Any = REQUIRED,
            label: str = "") -> Any:
    """An integer >= minimum (4.0 counts, True and 4.5 do not), or `default` when absent."""
    value = _get(cfg, key, where, default, label)
    if value is None:
        return default
    return as_int(value, label + key, where, minimum)


def as_int(value: Any, key: str, where: str, minimum: int) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    # bool is an int subclass: `true` where a count belongs is a corrupt config, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(where, key, f"an integer >= {minimum}", value)
    return value


def as_float(value: Any, key: str, where: str) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise bad(where, key, "a finite number > 0", value)
    return float(value)


def get_float(cfg: dict[str, Any], key: str, where: str, default: Any = REQUIRED, label: str = "") -> Any:
    """A finite number > 0, or `default` when absent."""
    value = _get(cfg, key, where, default, label)
    return default if value is None else as_float(value, label + key, where)


def get_cap(cfg: dict[str, Any], key: str, where: str, default: float | None) -> float | None:
    """A soft-capping value: `default` when the key is absent, None (off) when it is null, else a number > 0."""
    if key not in cfg:
        return default
    return None if cfg[key] is None else as_float(cfg[key], key, where)


def get_bool(cfg: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(where, key, "true or false", value)
    return value


def get_dict(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(where, key, "an object (or null)", value)
    return value


def get_str(cfg: dict[str, Any], key: str, where: str, default: str, allowed: tuple[str, ...]) -> str:
    """One of `allowed`; a string outside them is named as unsupported."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(where, key, f"a string such as {allowed[0]!r}", value)
    if value not in allowed:
        raise CheckpointError(f"{where}: {key} {value!r} is not supported by the engine (supported: "
                              f"{', '.join(allowed)})")
    return value


def token_ids(value: Any, key: str, where: str) -> list[int]:
    """A config's token id or list of them (eos_token_id may be either) as a list; [] for None."""
    if value is None:
        return []
    return [as_int(v, key, where, 0) for v in (value if isinstance(value, list) else [value])]
