"""The one plugin manager, the plugin loading policy, and the registries built from the hooks.

Built-ins are registered through the same hooks as third-party plugins (merger.builtin).
Entry points in group "merger" are loaded unless running under pytest; MERGER_LOAD_PLUGINS,
when set, is an allow-list of entry-point names (comma-separated; empty means none).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from merger import hookspecs
from merger.errors import PluginError

ENTRY_POINT_GROUP = "merger"
ENV_ALLOW = "MERGER_LOAD_PLUGINS"
DEFAULT_PLUGINS = ("merger.builtin",)
FILE_PREFIX = "file:"

pm = pluggy.PluginManager("merger")
pm.add_hookspecs(hookspecs)
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the default plugins and the allowed entry points once; fail loudly on typos."""
    global _loaded
    if _loaded:
        return pm
    for modname in DEFAULT_PLUGINS:
        if pm.get_plugin(modname) is None:
            register_plugin(importlib.import_module(modname), modname)
    load_entry_points()
    check_plugins()
    _loaded = True  # only now: after a failure, the next call reports it again
    return pm


def installed_entry_points() -> list[metadata.EntryPoint]:
    """Every entry point in group "merger" of the installed distributions."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def allowed_entry_points() -> list[metadata.EntryPoint]:
    """The entry points the policy loads: all of them; none under pytest; or the allow-list."""
    eps = installed_entry_points()
    allow = os.environ.get(ENV_ALLOW)
    if allow is None:
        return [] if "pytest" in sys.modules else eps
    names = {n.strip() for n in allow.split(",") if n.strip()}
    unknown = sorted(names - {ep.name for ep in eps})
    if unknown:
        installed = ", ".join(sorted({ep.name for ep in eps})) or "none"
        raise PluginError(f"{ENV_ALLOW} names {', '.join(map(repr, unknown))}, which no installed package "
                          f"provides (installed plugins: {installed}); fix the name or remove it")
    return [ep for ep in eps if ep.name in names]


def load_entry_points() -> None:
    """Import and register the allowed entry points; an import failure names the plugin."""
    seen: dict[str, str] = {}
    for ep in allowed_entry_points():
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in seen and seen[ep.name] != dist:
            raise PluginError(f"plugin name {ep.name!r} is provided by two packages, {seen[ep.name]!r} and "
                              f"{dist!r}; uninstall one")
        seen[ep.name] = dist
        if pm.get_plugin(ep.name) is not None:  # already registered in-process (e.g. by a test)
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # any import failure in third-party code
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}) failed to import: {type(e).__name__}: {first_line(e)}; "
                f"fix or uninstall it, or leave it out of {ENV_ALLOW}") from None
        register_plugin(plugin, ep.name)


def register_plugin(plugin: Any, name: str) -> None:
    """Validate a plugin's hookimpls, then register it; on any problem nothing stays registered."""
    validate_plugin(plugin, name)
    try:
        pm.register(plugin, name=name)
    except ValueError as e:  # the name or the object is registered already
        raise PluginError(f"plugin {name!r} is already registered ({first_line(e)})") from None


def unregister_plugin(name: str) -> None:
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)


@contextmanager
def registered(plugin: Any, name: str) -> Iterator[Any]:
    """Register `plugin` for the duration of a `with` block (tests); always unregisters."""
    load_plugins()
    register_plugin(plugin, name)
    try:
        yield plugin
    finally:
        unregister_plugin(name)


def validate_plugin(plugin: Any, name: str) -> None:
    """Catch what pluggy would accept silently or report as a multi-line error: a hookimpl for
    an unknown hook (a typo), arguments the hook does not pass, a merger_* function left unmarked."""
    specs = {h: getattr(pm.hook, h) for h in dir(pm.hook) if h.startswith("merger_")}
    specs = {h: c for h, c in specs.items() if c.has_spec()}
    for attr in dir(plugin):
        fn = getattr(plugin, attr, None)
        if not inspect.isroutine(fn):
            continue
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            if attr.startswith("merger_"):
                raise PluginError(f"plugin {name!r}: {attr} is not marked as a hook implementation; "
                                  f"decorate it with @merger.hookimpl")
            continue
        hook = opts.get("specname") or attr
        if hook not in specs:
            if opts.get("optionalhook"):
                continue
            near = difflib.get_close_matches(hook, specs, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise PluginError(f"plugin {name!r} implements {hook!r}, which is not a merger hook; "
                              f"{hint}(hooks: {', '.join(sorted(specs))})")
        spec_args = specs[hook].spec.argnames
        extra = [a for a in _required_args(fn) if a not in spec_args]
        if extra:
            raise PluginError(f"plugin {name!r}: {hook} asks for {', '.join(map(repr, extra))}, which the hook "
                              f"does not pass; its arguments are: {', '.join(spec_args)}")


def _required_args(fn: Any) -> list[str]:
    """Positional parameters without defaults, as pluggy matches them against the hookspec."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in kinds and p.default is p.empty and p.name != "self"]


def check_plugins() -> None:
    """pm.check_pending(), as one line naming the plugin."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {plugin_name(e.plugin)!r}: {first_line(e)}; "
                          f"a hookimpl name must match a merger_* hook") from None


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line: errors reach the user as one line."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def plugin_name(plugin: Any) -> str:
    return pm.get_name(plugin) or repr(plugin)


def collect(hook_name: str) -> dict[str, type]:
    """Call one `register` hook plugin by plugin; return {name: class}, rejecting duplicates."""
    load_plugins()
    found: dict[str, type] = {}
    owner: dict[str, str] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():  # registration order (pluggy calls hooks in reverse)
        pname = impl.plugin_name

        def register(cls: type, _pname: str = pname) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_pname!r} registered {cls!r} without a `name`")
            if name in found:
                raise PluginError(
                    f"{name!r} is registered twice: by plugin {owner[name]!r} and by plugin {_pname!r}; "
                    f"rename one, uninstall one, or leave one out of {ENV_ALLOW}")
            found[name] = cls
            owner[name] = _pname
            cls._merger_plugin = _pname

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(f"plugin {pname!r} failed in {hook_name}: {type(e).__name__}: {first_line(e)}") from None
    return found


def methods() -> dict[str, type]:
    """Registered merge methods by name."""
    return collect("merger_register_methods")


def gate_initializers() -> dict[str, type]:
    """Registered MoE gate initializers by name."""
    return collect("merger_register_gate_initializers")


def hook_names(plugin: Any) -> list[str]:
    return sorted({caller.name for caller in (pm.get_hookcallers(plugin) or [])})


def distribution_of(name: str) -> tuple[str, str]:
    """(distribution, version) behind a plugin name: an installed package, merger itself for
    the built-ins, "file" for a one-off file, "in-process" for pm.register calls."""
    if name.startswith(FILE_PREFIX):
        return "file", ""  # the path is in the name
    if name in DEFAULT_PLUGINS:
        try:
            return "merger", metadata.version("merger")
        except metadata.PackageNotFoundError:
            return "merger", "unknown"
    for ep in installed_entry_points():
        if ep.name == name and ep.dist is not None:
            return ep.dist.name, ep.dist.version
    return "in-process", ""


def describe_plugins() -> list[dict[str, Any]]:
    """One row per plugin for `merger plugins`: loaded ones with what they registered, then
    installed entry points the policy left out (loaded: false)."""
    registered_by: dict[str, list[str]] = {}
    for kind, reg in (("method", methods()), ("gate", gate_initializers())):
        for name, cls in reg.items():
            registered_by.setdefault(cls._merger_plugin, []).append(f"{kind}:{name}")
    rows = []
    for name, plug in pm.list_name_plugin():
        if plug is None:  # blocked names have no plugin object
            continue
        dist, version = distribution_of(name)
        rows.append({"name": name, "distribution": dist, "version": version, "loaded": True,
                     "module": getattr(plug, "__name__", type(plug).__name__),
                     "hooks": hook_names(plug), "registered": sorted(registered_by.get(name, []))})
    for ep in installed_entry_points():
        if pm.get_plugin(ep.name) is None:
            rows.append({"name": ep.name, "distribution": ep.dist.name if ep.dist else "?",
                         "version": ep.dist.version if ep.dist else "", "loaded": False,
                         "module": ep.value, "hooks": [], "registered": []})
    return rows


def load_plugin_file(path: str | Path) -> str:
    """Import a one-off plugin module from a .py file and register it as "file:<resolved path>";
    loading the same file twice is a no-op. Returns the plugin name."""
    path = Path(path).expanduser().resolve()
    name = f"{FILE_PREFIX}{path}"
    if pm.get_plugin(name) is not None:
        return name
    if path.suffix != ".py":
        raise PluginError(f"plugin file {path} is not a .py file; installed plugins load by themselves "
                          f"(see `merger plugins`)")
    if not path.is_file():
        raise PluginError(f"plugin file {path} not found")
    load_plugins()
    # In sys.modules while it runs, so pydantic and dataclasses can resolve its annotations.
    modname = f"merger_plugin_file_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    spec = importlib.util.spec_from_file_location(modname, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
        register_plugin(module, name)
    except PluginError:
        sys.modules.pop(modname, None)
        raise
    except Exception as e:
        sys.modules.pop(modname, None)
        raise PluginError(f"plugin file {path} failed to import: {type(e).__name__}: {first_line(e)}") from None
    return name
