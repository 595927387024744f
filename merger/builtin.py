"""The default plugin: registers every built-in method, gate initializer and resolver through
the same public hooks a third-party plugin uses."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from merger.hookspecs import hookimpl
from merger.methods.linear import Linear
from merger.methods.passthrough import Passthrough
from merger.methods.task_arithmetic import TaskArithmetic
from merger.moe.gates import BUILTIN_GATES


@hookimpl
def merger_register_methods(register) -> None:
    for cls in (Linear, TaskArithmetic, Passthrough):
        register(cls)


@hookimpl
def merger_register_gate_initializers(register) -> None:
    for cls in BUILTIN_GATES:
        register(cls)


@hookimpl
def merger_resolve_model(reference: str, options: dict[str, Any]) -> Path | None:
    """A local folder: absolute, or relative to options['base_dir'] (default: current folder)."""
    path = Path(reference).expanduser()
    if not path.is_absolute():
        path = Path(options.get("base_dir") or ".") / path
    return path if path.exists() else None
