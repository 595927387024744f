"""Recipe models (mergekit's YAML format) and `load_recipe`, which validates every name and
value against the plugin registries before any tensor is read. Errors carry the YAML path."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from merger import plugins
from merger.errors import PluginError, RecipeError
from merger.io.dtypes import parse_dtype


def check_param_value(value: Any) -> Any:
    """A parameter is a scalar, a gradient list of numbers, or a list of {filter, value} entries."""
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list is not a value; give a scalar, a gradient list or filter entries")
        if all(isinstance(v, dict) for v in value):
            for k, entry in enumerate(value):
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise ValueError(f"entry {k}: a filter entry has keys `filter` (optional) and `value`")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise ValueError(f"entry {k}: `filter` must be a string (a substring of tensor names)")
                if isinstance(entry["value"], (list, dict)) and not _is_gradient(entry["value"]):
                    raise ValueError(f"entry {k}: `value` must be a scalar or a list of numbers")
            return value
        if _is_gradient(value):
            return value
        raise ValueError("a list value must be all numbers (a gradient) or all {filter, value} entries")
    if isinstance(value, dict):
        raise ValueError("a mapping is not a value; use a list of {filter, value} entries")
    return value


def _is_gradient(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def candidate_values(value: Any) -> list[Any]:
    """Every scalar a parameter spec can produce (gradient ends stand in for their range)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out: list[Any] = []
        for entry in value:
            out.extend(candidate_values(entry["value"]))
        return out
    if isinstance(value, list):
        return [min(value), max(value)] if len(value) > 1 else [value[0]]
    return [value]


Params = dict[str, Any]


def _check_dtype(v: str) -> str:
    parse_dtype(v)  # ValueError names the accepted dtypes
    return v


DtypeName = Annotated[str, AfterValidator(_check_dtype)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("parameters", mode="after", check_fields=False)
    @classmethod
    def _check_params(cls, v: Params) -> Params:
        for key, value in v.items():
            try:
                check_param_value(value)
            except ValueError as e:
                raise ValueError(f"parameter {key!r}: {e}") from None
        return v


class ModelEntry(_Model):
    model: str
    parameters: Params = Field(default_factory=dict)


class SliceSource(_Model):
    model: str
    layer_range: tuple[int, int]
    parameters: Params = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class SliceSpec(_Model):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: Params = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_length(self) -> SliceSpec:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("every source of a slice needs a layer_range of the same length")
        return self


class MergeRecipe(_Model):
    """A mergekit-style merge recipe: `models` or `slices`, one merge_method."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceSpec] | None = None
    parameters: Params = Field(default_factory=dict)
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    tokenizer_source: str | None = None
    name: str | None = None
    plugins: list[str] = Field(default_factory=list)

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer(cls, v: str | None) -> str | None:
        if v == "union":
            raise ValueError("`union` (merging vocabularies) is not supported; use `base` or a model reference")
        return v

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeRecipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give either `models` or `slices` (not both, not neither)")
        if self.models is not None and not self.models:
            raise ValueError("`models` is empty; list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("`slices` is empty; list at least one slice")
        return self

    # --- helpers used by the planner and the CLI ------------------------------------------
    def model_refs(self) -> list[str]:
        """Every distinct model reference, in first-use order (base first)."""
        refs = [self.base_model] if self.base_model else []
        if self.models is not None:
            refs += [m.model for m in self.models]
        for s in self.slices or []:
            refs += [src.model for src in s.sources]
        if self.tokenizer_source and self.tokenizer_source != "base":
            refs.append(self.tokenizer_source)
        return list(dict.fromkeys(refs))

    def method(self) -> type:
        return plugins.methods()[self.merge_method]


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "recipe"


def read_yaml(path: str | Path) -> tuple[dict[str, Any], str]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (merge_method:, models: ...), not {type(data).__name__}")
    return data, text


def parse_model(cls: type[BaseModel], data: dict[str, Any], path: str | Path) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against mergekit's recipe format"
        elif err["type"] == "missing":
            msg = "required field is missing"
        raise RecipeError(f"{path}: {format_loc(err['loc'])}: {msg}") from None


def load_recipe(path: str | Path) -> BaseModel:
    """Read and validate a recipe: a MergeRecipe, or an MoE recipe when it has `experts`."""
    data, text = read_yaml(path)
    load_recipe_plugins(data, path)
    if "experts" in data:
        from merger.moe.recipe import load_moe_recipe
        recipe = load_moe_recipe(data, path)
    else:
        recipe = parse_model(MergeRecipe, data, path)
        validate_merge_recipe(recipe, path)
    recipe._source_text = text  # type: ignore[attr-defined]
    return recipe


def load_recipe_plugins(data: dict[str, Any], path: str | Path) -> None:
    """Load the recipe's `plugins:` files before its names are checked against the registries;
    relative paths start from the recipe's folder, so a recipe and its plugin travel together."""
    files = data.get("plugins")
    if files is None:
        return
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise RecipeError(f"{path}: plugins: give a list of .py files (relative to the recipe's folder)")
    for i, name in enumerate(files):
        file = Path(name).expanduser()
        try:
            plugins.load_plugin_file(file if file.is_absolute() else Path(path).parent / file)
        except PluginError as e:
            raise PluginError(f"{path}: plugins[{i}]: {e}") from None


class _Field:
    """One parameter of a method: the keys a recipe may use for it, a validator, requiredness."""

    def __init__(self, name: str, info: Any):
        from typing import Annotated

        self.name = name
        self.key = info.alias or name
        self.keys = {name, self.key}
        ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        self.adapter = TypeAdapter(ann)
        self.required = info.is_required()

    def given(self, *levels: Params) -> bool:
        return any(k in level for level in levels for k in self.keys)


def _fields(model: type[BaseModel]) -> dict[str, _Field]:
    """Every accepted key (field name and alias) -> its _Field."""
    out: dict[str, _Field] = {}
    for name, info in model.model_fields.items():
        f = _Field(name, info)
        out.update({k: f for k in f.keys})
    return out


def _first_values(params: Params, fields: dict[str, _Field]) -> dict[str, Any]:
    return {k: candidate_values(v)[0] for k, v in params.items() if k in fields}


def _cross_check(model: type[BaseModel], values: dict[str, Any], where: str) -> None:
    """Run a Params model's own validators (e.g. della's epsilon vs density) on representative values."""
    try:
        model.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] != "missing":
            raise RecipeError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


def unknown_name(path: str | Path, field: str, kind: str, name: str, registry: dict[str, type]) -> RecipeError:
    """The error for a name no plugin registered, listing the registered ones."""
    return RecipeError(f"{path}: {field}: unknown {kind} {name!r}; registered: {', '.join(sorted(registry))} "
                       f"(a plugin's {kind} needs its package installed, or its .py file under `plugins:`)")


def validate_merge_recipe(recipe: MergeRecipe, path: str | Path) -> None:
    """Check the method, its parameter names and values, model counts and the base, by YAML path."""
    registry = plugins.methods()
    if recipe.merge_method not in registry:
        raise unknown_name(path, "merge_method", "method", recipe.merge_method, registry)
    method = registry[recipe.merge_method]
    gfields, mfields = _fields(method.Params), _fields(method.ModelParams)

    def check(params: Params, where: str, allow_global: bool) -> None:
        for key, value in params.items():
            loc = f"{where}.parameters.{key}" if where else f"parameters.{key}"
            field = mfields.get(key) or (gfields.get(key) if allow_global else None)
            if field is None:
                known = sorted({f.key for f in mfields.values()} | ({f.key for f in gfields.values()} if allow_global else set()))
                scope = "" if allow_global else " per model"
                raise RecipeError(f"{path}: {loc}: {method.name} has no parameter {key!r}{scope}; "
                                  f"known: {', '.join(known) or 'none'}")
            for v in candidate_values(value):
                try:
                    field.adapter.validate_python(v)
                except ValidationError as e:
                    msg = e.errors()[0]["msg"].removeprefix("Value error, ")
                    raise RecipeError(f"{path}: {loc}: {msg} (got {v!r})") from None

    check(recipe.parameters, "", True)
    groups: list[tuple[str, Params, list[tuple[str, str, Params]]]] = []
    if recipe.models is not None:
        groups.append(("", {}, [(f"models[{i}]", m.model, m.parameters) for i, m in enumerate(recipe.models)]))
    for si, s in enumerate(recipe.slices or []):
        check(s.parameters, f"slices[{si}]", True)
        groups.append((f"slices[{si}]", s.parameters,
                       [(f"slices[{si}].sources[{j}]", src.model, src.parameters) for j, src in enumerate(s.sources)]))

    has_base = recipe.base_model is not None
    for where, slice_params, members in groups:
        for loc, _ref, params in members:
            check(params, loc, False)
        inputs = [(loc, ref, params) for loc, ref, params in members
                  if method.base_is_input or ref != recipe.base_model]
        if method.base_is_input and has_base and recipe.base_model not in [r for _, r, _ in members]:
            inputs.append(("base_model", recipe.base_model, {}))
        try:
            method.check_models(len(inputs), has_base)
        except ValueError as e:
            raise RecipeError(f"{path}: {where + '.' if where else ''}merge_method: {e}") from None
        for loc, _ref, params in inputs:
            levels = (params, slice_params, recipe.parameters)
            for f in set(mfields.values()):
                if f.required and not f.given(*levels):
                    raise RecipeError(f"{path}: {loc}.parameters.{f.key}: required by {method.name}; "
                                      f"set it per model or in the top-level parameters")
            merged = {**recipe.parameters, **slice_params, **params}
            _cross_check(method.ModelParams, _first_values(merged, mfields), f"{path}: {loc}.parameters")
    for f in set(gfields.values()):
        if f.required and not (f.given(recipe.parameters) or (
                recipe.slices and all(f.given(s.parameters) for s in recipe.slices))):
            raise RecipeError(f"{path}: parameters.{f.key}: required by {method.name}")
    _cross_check(method.Params, _first_values(recipe.parameters, gfields), f"{path}: parameters")
