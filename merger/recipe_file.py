"""Reading a recipe file: `load_recipe` reads it safely (a regular file of bounded size, UTF-8 YAML whose
mappings have no repeated keys, bounded nesting and bounded size once aliases are expanded), loads its
plugin files and validates it as a merge or, when it has `experts`, an MoE recipe. Errors are one
RecipeError line naming the file (and the line, for YAML errors)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from merger.errors import RecipeError
from merger.io.files import read_user_text
from merger.merge_plan import check_constant_params
from merger.moe.recipe import load_moe_recipe
from merger.recipe import MergeRecipe, lift_single_module, load_recipe_plugins, parse_model, validate_merge_recipe

MAX_RECIPE_BYTES = 4 * 1024 * 1024   # recipes are kilobytes; prompt lists for MoE gates stay far below this
MAX_NODES = 200_000                  # values once YAML aliases are expanded (an alias "bomb" stops here)
MAX_DEPTH = 64                       # nesting of lists and mappings


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML takes the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                    key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping (first at line "
                            f"{seen[key].start_mark.line + 1}); keep one", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_text(path: str | Path, what: str = "recipe") -> str:
    """The text of a regular file of at most MAX_RECIPE_BYTES; never blocks on a FIFO or device."""
    return read_user_text(path, what, MAX_RECIPE_BYTES, RecipeError)


def load_yaml(text: str, path: str | Path) -> Any:
    """Parse one YAML document with the checks above."""
    docs = load_documents(text, path)
    if len(docs) != 1:
        raise RecipeError(f"{path}: holds {len(docs)} YAML documents; a multi-stage file is read with "
                          f"merger.stages.load_pipeline (merger build and validate do that)")
    return docs[0][0]


def load_documents(text: str, path: str | Path) -> list[tuple[Any, str]]:
    """(data, its own text) of every YAML document in `text` (documents are separated by `---`)."""
    pairs = []  # (node, data): each document composed once, then built from its node
    loader = _StrictLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            pairs.append((node, loader.construct_document(node)))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: the YAML is nested too deeply; a recipe needs a few levels") from None
    finally:
        loader.dispose()
    docs = []
    for node, data in pairs:
        _check_size(data, path)
        docs.append((data, text[node.start_mark.index:node.end_mark.index] if node is not None else ""))
    return docs or [(None, "")]


def _check_size(data: Any, path: str | Path) -> None:
    """Count values as a consumer would see them (aliases expanded), without expanding anything."""
    sizes: dict[int, int] = {}

    def size(v: Any, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise RecipeError(f"{path}: the YAML is nested more than {MAX_DEPTH} levels deep; "
                              f"a recipe needs a few levels")
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) in sizes:
            return sizes[id(v)]
        items = list(v.values()) if isinstance(v, dict) else v
        n = 1 + sum(size(x, depth + 1) for x in items)
        if n > MAX_NODES:
            raise RecipeError(f"{path}: the YAML expands to more than {MAX_NODES} values (through aliases?); "
                              f"write the recipe out plainly")
        sizes[id(v)] = n
        return n

    size(data, 0)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], str]:
    """(mapping, text) of a one-document recipe file."""
    text = read_text(path)
    data = load_yaml(text, path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (merge_method:, models: ...), not "
                          f"{type(data).__name__}")
    return data, text


def load_recipe(path: str | Path) -> BaseModel:
    """Read and validate a one-document recipe: a MergeRecipe, or an MoE recipe when it has `experts`."""
    data, text = read_yaml(path)
    return recipe_from_data(data, text, path, str(path))


def recipe_from_data(data: dict[str, Any], text: str, path: str | Path, label: str) -> BaseModel:
    """Validate one recipe mapping; `path` is the file (plugin paths start from its folder), `label`
    what errors name (the file, and for a multi-stage file the document)."""
    load_recipe_plugins(data, label, Path(path).parent)
    if "experts" in data:
        recipe = load_moe_recipe(data, label)
    else:
        recipe = parse_model(MergeRecipe, lift_single_module(data, label), label)
        validate_merge_recipe(recipe, label)
        check_constant_params(recipe, label)
    recipe._source_text = text  # type: ignore[attr-defined]
    recipe._source_path = str(path)  # type: ignore[attr-defined]
    return recipe
