"""`merger search`'s search space: a YAML mapping from recipe paths (`models[1].parameters.weight`) to a
range or choices (forms in `parse_dim`), put into a recipe mapping by `apply`, and `check_space`: every range
end and choice must pass the recipe's own validation before the first trial, so a typo or an out-of-range
value fails at once, while cross-field rules (della's density ± epsilon) fail only the trials that break them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.errors import MergerError
from merger.errors import SearchError

_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")
MAX_COMBOS = 64   # categorical combinations tried when checking a value; beyond, the recipe's own values


@dataclass(frozen=True)
class Dim:
    """One searched recipe field. `name` is the path as written (also the optuna parameter name)."""

    name: str
    path: tuple[str | int, ...]
    kind: str                         # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[tuple[str, Any]]:
        """(what it is, value) for each value the up-front check tries."""
        if self.kind == "categorical":
            return [("choice", c) for c in self.choices]
        lo, hi = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
        return [("the range's lower end", lo), ("the range's upper end", hi)]


def parse_path(text: str, where: str) -> tuple[str | int, ...]:
    """`models[1].parameters.weight` -> ("models", 1, "parameters", "weight")."""
    out: list[str | int] = []
    for part in text.split("."):
        m = _STEP.fullmatch(part)
        if not m:
            raise SearchError(f"{where}: {text!r} is not a recipe path; write it like models[1].parameters.weight")
        out.append(m.group(1))
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(out)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_dim(name: str, spec: Any, where: str) -> Dim:
    """One entry of the space file:

        models[1].parameters.weight: [0.0, 1.0]          # two numbers: a float range (uniform)
        parameters.density: {low: 0.2, high: 0.9, step: 0.1}   # or {low, high, log: true} / {..., type: int}
        merge_method: [ties, dare_ties]                  # anything else in a list: a categorical choice
        parameters.normalize: {choices: [true, false]}   # choices spelled out (numbers too)
    """
    path = parse_path(name, where)
    here = f"{where}: {name}"
    if isinstance(spec, list):
        if spec and all(_number(v) for v in spec):
            if len(spec) != 2:
                raise SearchError(f"{here}: a range is [low, high] (two numbers); for a set of values write "
                                  f"{{choices: {spec}}}")
            spec = {"low": spec[0], "high": spec[1]}
        else:
            spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise SearchError(f"{here}: give [low, high], a list of choices, or {{low, high, log, step, type}} / "
                          f"{{choices: [...]}}, not {spec!r}")
    keys = set(spec)
    if "choices" in keys:
        choices = spec["choices"]
        if keys - {"choices"} or not isinstance(choices, list) or not choices:
            raise SearchError(f"{here}: {{choices: [...]}} takes one non-empty list and nothing else")
        bad = next((c for c in choices if not (c is None or isinstance(c, (str, bool)) or _number(c))), None)
        if bad is not None:
            raise SearchError(f"{here}: choice {bad!r} is not a plain value (a string, number, boolean or null)")
        if len({repr(c) for c in choices}) != len(choices):
            raise SearchError(f"{here}: a choice is listed twice; list each once")
        return Dim(name, path, "categorical", choices=tuple(choices))
    unknown = keys - {"low", "high", "log", "step", "type"}
    if unknown or not {"low", "high"} <= keys:
        raise SearchError(f"{here}: a range takes low, high and optionally log, step, type (float or int); "
                          f"got {', '.join(sorted(map(str, keys)))}")
    low, high, step = spec["low"], spec["high"], spec.get("step")
    log, kind = spec.get("log", False), spec.get("type", "float")
    if not (_number(low) and _number(high)) or low >= high:
        raise SearchError(f"{here}: low {low!r} and high {high!r} must be finite numbers with low < high")
    if kind not in ("float", "int") or not isinstance(log, bool):
        raise SearchError(f"{here}: type is float or int and log is true or false")
    if step is not None and not (_number(step) and step > 0):
        raise SearchError(f"{here}: step must be a positive number")
    if log and (low <= 0 or step is not None):
        raise SearchError(f"{here}: a log range needs low > 0 and no step")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise SearchError(f"{here}: an int range needs whole numbers for low, high and step")
    return Dim(name, path, kind, float(low), float(high), log, None if step is None else float(step))


def load_space(path: str | Path) -> tuple[list[Dim], str]:
    """(dimensions, the file's text) of a search-space file, read with the recipe reader's safety limits."""
    from merger.recipe_file import load_yaml, read_text

    try:
        text = read_text(path, what="search space")
        data = load_yaml(text, path)
    except MergerError as e:
        raise SearchError(str(e)) from None
    if not isinstance(data, dict) or not data:
        raise SearchError(f"{path}: a search space is a YAML mapping of recipe paths to ranges or choices, "
                          "e.g. `models[1].parameters.weight: [0.0, 1.0]`")
    dims = []
    for name, spec in data.items():
        if not isinstance(name, str):
            raise SearchError(f"{path}: key {name!r} is not a recipe path; write it like models[1].parameters.weight")
        dims.append(parse_dim(name, spec, str(path)))
    return dims, text


def set_value(data: dict[str, Any], dim: Dim, value: Any, where: str) -> None:
    """Put `value` at dim.path in the recipe mapping `data` (in place)."""
    node: Any = data
    walked = ""
    for i, key in enumerate(dim.path):
        last = i == len(dim.path) - 1
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                have = f"it lists {len(node)}" if isinstance(node, list) else "it is not a list"
                raise SearchError(f"{where}: {dim.name}: the recipe has no {walked}[{key}] ({have})")
            walked += f"[{key}]"
        else:
            if not isinstance(node, dict):
                raise SearchError(f"{where}: {dim.name}: the recipe's {walked or 'top level'} is not a mapping")
            if not last and key not in node:
                if key != "parameters":
                    missing = f"{walked}.{key}" if walked else key
                    raise SearchError(f"{where}: {dim.name}: the recipe has no {missing}; "
                                      "check the path against the recipe")
                node[key] = {}
            if not last and key == "parameters" and node[key] is None:
                node[key] = {}
            walked += f".{key}" if walked else key
        if last:
            node[key] = value
        else:
            node = node[key]


def apply(data: dict[str, Any], dims: list[Dim], values: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of the recipe mapping with each dimension's value put in place."""
    out = copy.deepcopy(data)
    for d in dims:
        if d.name in values:
            set_value(out, d, values[d.name], where)
    return out


def absolute_plugins(data: dict[str, Any], recipe_path: Path) -> dict[str, Any]:
    """The recipe mapping with `plugins:` files made absolute, so a trial recipe written elsewhere finds them."""
    files = data.get("plugins")
    if not isinstance(files, list):
        return data
    out = dict(data)
    out["plugins"] = [str((recipe_path.parent / Path(f).expanduser()).absolute()) if isinstance(f, str)
                      and not Path(f).expanduser().is_absolute() else f for f in files]
    return out


def validate_data(data: dict[str, Any], label: str) -> None:
    """The checks `load_recipe` runs on a recipe mapping (names, parameters, values), without a file (its
    `plugins:` paths are absolute: absolute_plugins), less the one on parameter values together (della's
    density ± epsilon): a value that cannot build is a failed trial, not a bad space."""
    from merger.moe.recipe import load_moe_recipe
    from merger.recipe import MergeRecipe, lift_single_module, load_recipe_plugins, parse_model, validate_merge_recipe

    load_recipe_plugins(data, label)
    if "experts" in data:
        load_moe_recipe(data, label)
    else:
        validate_merge_recipe(parse_model(MergeRecipe, lift_single_module(data, label), label), label)


def check_space(data: dict[str, Any], dims: list[Dim], space_path: str, recipe_label: str) -> None:
    """Every path reachable, every range end and choice valid in the recipe for at least one combination
    of the other categorical choices; else one SearchError naming the space file, the path and why."""
    cats = [d for d in dims if d.kind == "categorical"]
    for d in dims:
        others = [c for c in cats if c is not d]
        combos = list(itertools.islice(itertools.product(*(c.choices for c in others)), MAX_COMBOS)) or [()]
        for what, value in d.extremes():
            reason = None
            for combo in combos:
                values = {c.name: v for c, v in zip(others, combo)} | {d.name: value}
                trial = apply(data, [*others, d], values, space_path)
                try:
                    with contextlib.redirect_stderr(io.StringIO()):  # validation's warnings: once per trial
                        validate_data(trial, recipe_label)
                    reason = None
                    break
                except MergerError as e:
                    reason = reason or str(e)
            if reason is not None:
                raise SearchError(f"{space_path}: {d.name}: {what} {value!r} does not fit the recipe: {reason}")
