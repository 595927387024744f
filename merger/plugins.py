"""The one plugin manager, the plugin loading policy, and the registries built from the hooks.

Built-ins are registered through the same hooks as third-party plugins (merger.builtin).
Entry points in group "merger" are loaded unless running under pytest; MERGER_LOAD_PLUGINS,
when set, is an allow-list of entry-point names (comma-separated; empty means none).
"""
from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from merger import hookspecs
from merger.errors import PluginError

ENTRY_POINT_GROUP = "merger"
DEFAULT_PLUGINS = ("merger.builtin",)

pm = pluggy.PluginManager("merger")
pm.add_hookspecs(hookspecs)
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the default plugins and the allowed entry points once; fail loudly on typos."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for modname in DEFAULT_PLUGINS:
        if pm.get_plugin(modname) is None:
            pm.register(importlib.import_module(modname), name=modname)
    allow = os.environ.get("MERGER_LOAD_PLUGINS")
    if allow is not None or "pytest" not in sys.modules:
        allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # any import failure in third-party code
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) failed to import: {type(e).__name__}: {e}; "
                    f"fix or uninstall it, or set MERGER_LOAD_PLUGINS to skip it") from None
            pm.register(plugin, name=ep.name)
    check_plugins()
    return pm


def check_plugins() -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin!r}: {e}; a hookimpl name must match a merger_* hook") from None


def plugin_name(plugin: Any) -> str:
    return pm.get_name(plugin) or repr(plugin)


def collect(hook_name: str) -> dict[str, type]:
    """Call one `register` hook plugin by plugin; return {name: class}, rejecting duplicates."""
    load_plugins()
    found: dict[str, type] = {}
    owner: dict[str, str] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):  # registration order
        pname = impl.plugin_name

        def register(cls: type, _pname: str = pname) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_pname!r} registered {cls!r} without a `name`")
            if name in found:
                raise PluginError(
                    f"{name!r} is registered twice: by plugin {owner[name]!r} and by plugin {_pname!r}; "
                    f"uninstall one or set MERGER_LOAD_PLUGINS")
            found[name] = cls
            owner[name] = _pname
            cls._merger_plugin = _pname

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(f"plugin {pname!r} failed in {hook_name}: {type(e).__name__}: {e}") from None
    return found


def methods() -> dict[str, type]:
    """Registered merge methods by name."""
    return collect("merger_register_methods")


def gate_initializers() -> dict[str, type]:
    """Registered MoE gate initializers by name."""
    return collect("merger_register_gate_initializers")


def hook_names(plugin: Any) -> list[str]:
    return sorted(impl.name for impl in (pm.get_hookcallers(plugin) or []))


def distribution_of(plugin_name_: str) -> tuple[str, str]:
    """(distribution, version) that provides a loaded plugin, or ('merger', version) for built-ins."""
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == plugin_name_ and ep.dist is not None:
            return ep.dist.name, ep.dist.version
    try:
        return "merger", metadata.version("merger")
    except metadata.PackageNotFoundError:
        return "merger", "unknown"


def load_plugin_file(path: str | Path) -> None:
    """Import a one-off plugin module from a .py file and register it (name: the file's stem)."""
    import importlib.util

    path = Path(path)
    name = f"file:{path.stem}"
    if pm.get_plugin(name) is not None:
        return
    if not path.is_file():
        raise PluginError(f"plugin file {path} not found")
    spec = importlib.util.spec_from_file_location(f"merger_local_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise PluginError(f"plugin file {path} failed to import: {type(e).__name__}: {e}") from None
    load_plugins()
    pm.register(module, name=name)
    check_plugins()
