"""Every hook a merger plugin can implement. Hooks take a `register` callback rather than
returning lists, so the plugin manager knows which plugin registered what."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("merger")
hookimpl = pluggy.HookimplMarker("merger")


@hookspec
def merger_register_methods(register: Callable[[type], None]) -> None:
    """Register merge methods: call `register(cls)` once per `MergeMethod` subclass."""


@hookspec
def merger_register_gate_initializers(register: Callable[[type], None]) -> None:
    """Register MoE gate initializers: call `register(cls)` once per `GateInitializer` subclass."""


@hookspec(firstresult=True)
def merger_resolve_model(reference: str, options: dict[str, Any]) -> Path | None:
    """Turn a recipe's model reference into a local folder, or return None to let another
    resolver try. `options` carries e.g. `base_dir`, `allow_pickle`, `endpoint`, `offline`."""


@hookspec
def merger_register_commands(app: Any) -> None:
    """Add typer commands to the `merger` CLI (called when the app is built, never at import)."""
