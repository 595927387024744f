"""Merge recipe models (mergekit's YAML format), the pieces every recipe model shares, and the
validation of names and values against the plugin registries before any model is opened. Parameter values are typed
(merger.params) from here on. Errors carry the YAML path (`models[2].parameters.weight`)."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from merger import plugins
from merger.errors import PluginError, RecipeError, warn
from merger.io.dtypes import parse_dtype
from merger.params import Level, ParamMap, ParamValue, fields_of


def _check_dtype(v: str) -> str:
    parse_dtype(v)  # ValueError names the accepted dtypes
    return v


def _check_reference(v: str) -> str:
    if not v.strip():
        raise ValueError("is empty; give a model folder, a .gguf file or a Hub repo id (org/name)")
    if "\x00" in v or "\n" in v:
        raise ValueError(f"{v!r} is not a model reference (it holds a NUL byte or a line break)")
    return v


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expects a number, not the boolean {str(v).lower()}")
    return v


DtypeName = Annotated[str, AfterValidator(_check_dtype)]
ModelRef = Annotated[str, AfterValidator(_check_reference)]
# Numbers in recipe fields: a boolean is a typo here (pydantic would read `true` as 1)
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class RecipeModel(BaseModel):
    """Base of every recipe mapping: unknown keys and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelEntry(RecipeModel):
    model: ModelRef
    parameters: ParamMap = Field(default_factory=dict)


class SliceSource(RecipeModel):
    model: ModelRef
    layer_range: tuple[Int, Int]
    parameters: ParamMap = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class SliceSpec(RecipeModel):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: ParamMap = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_length(self) -> SliceSpec:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("every source of a slice needs a layer_range of the same length")
        return self


class ModelTokenSource(RecipeModel):
    """A token's row taken from another token of one model: `{kind: model_token, model, token | token_id}`."""

    kind: Literal["model_token"]
    model: ModelRef
    token: str | None = None
    token_id: Int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of `token` and `token_id`")
        return self


class ZeroSource(RecipeModel):
    """A token's row is all zeros: `{kind: zero}`."""

    kind: Literal["zero"]


class TokenSpec(RecipeModel):
    """Where one output token's embedding comes from (`tokenizer.tokens.<token>`); with `force`, for
    every input, even one that has the token itself."""

    source: ModelRef | ModelTokenSource | ZeroSource | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        """One clear error instead of pydantic's per-member union errors."""
        if v is None or isinstance(v, str):
            return v if v is None else _check_reference(v)
        if isinstance(v, dict):
            kinds = {"model_token": ModelTokenSource, "zero": ZeroSource}
            if v.get("kind") not in kinds:
                raise ValueError(f"`kind` must be model_token or zero, got {v.get('kind')!r}")
            try:
                return kinds[v["kind"]].model_validate(v)
            except ValidationError as e:
                err = e.errors()[0]
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
                raise ValueError(f"{format_loc(err['loc'])}: {msg}" if err["loc"] else msg) from None
        raise ValueError("give a model reference, {kind: model_token, model, token | token_id} or {kind: zero}")


class TokenizerSpec(RecipeModel):
    """mergekit's `tokenizer:` block."""

    source: ModelRef = "union"
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: Int | None = Field(default=None, ge=1, le=65536)


class MergeRecipe(RecipeModel):
    """A mergekit-style merge recipe: `models` or `slices`, one merge_method."""

    merge_method: str
    base_model: ModelRef | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceSpec] | None = None
    parameters: ParamMap = Field(default_factory=dict)
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    tokenizer_source: ModelRef | None = None   # base, union or a model reference
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None           # auto, a built-in name, or a Jinja template
    name: str | None = None
    plugins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeRecipe:
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give `tokenizer_source` or a `tokenizer:` block, not both (tokenizer.source "
                             "takes the same values)")
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
        source = self.vocab_source
        if source not in (None, "base", "union"):
            refs.append(source)
        for spec in ((self.tokenizer.tokens or {}).values() if self.tokenizer else ()):
            if isinstance(spec.source, str):
                refs.append(spec.source)
            elif isinstance(spec.source, ModelTokenSource):
                refs.append(spec.source.model)
        return list(dict.fromkeys(refs))

    @property
    def vocab_source(self) -> str | None:
        """`tokenizer_source`, or the `tokenizer:` block's source; None: the base's tokenizer as it is,
        no alignment (mergekit's default)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

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


def method_parameter_keys() -> dict[str, list[str]]:
    """Every parameter key some registered method takes -> the methods taking it."""
    out: dict[str, list[str]] = {}
    for name, cls in plugins.methods().items():
        for key in set(fields_of(cls.Params)) | set(fields_of(cls.ModelParams)):
            out.setdefault(key, []).append(name)
    return out


def _recipe_keys() -> set[str]:
    """Every key of every recipe mapping (the MoE recipe's too: they derive from RecipeModel)."""
    keys: set[str] = set()
    todo = [RecipeModel]
    while todo:
        cls = todo.pop()
        keys |= set(cls.model_fields)
        todo += cls.__subclasses__()
    return keys


def unknown_field(loc: tuple[Any, ...]) -> str:
    """The message for a key no recipe model has: where a method parameter belongs, or the near spelling."""
    key = str(loc[-1])
    params = method_parameter_keys()
    if key in params:
        parent = format_loc(loc[:-1])
        where = "the top-level `parameters:`" if len(loc) == 1 else f"`{parent}.parameters:`"
        return f"{key!r} is a method parameter ({', '.join(sorted(params[key])[:3])}...); put it under {where}"
    near = difflib.get_close_matches(key, sorted(_recipe_keys() | set(params)), n=1, cutoff=0.75)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown field; {hint}check the spelling against mergekit's recipe format"


def parse_model(cls: type[BaseModel], data: dict[str, Any], path: str | Path) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "json-"))))
        if err["type"] == "extra_forbidden":
            msg = unknown_field(loc)
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "finite_number":
            msg = f"{err.get('input')} is not a finite number; give a real value"
        raise RecipeError(f"{path}: {format_loc(loc)}: {msg}") from None


def lift_single_module(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """mergekit's multi-module form with one module (`modules: {default: {slices: ...}}`, as published
    recipes use it) is the same recipe with that module's `slices`/`models` at the top; the module's
    `parameters` sit between the top level's and the slices' (so they override the top level's)."""
    modules = data.get("modules")
    if modules is None:
        return data
    if not isinstance(modules, dict) or not modules:
        raise RecipeError(f"{path}: modules: give a mapping of module names to {{slices: ...}} or {{models: ...}}")
    if len(modules) > 1:
        raise RecipeError(f"{path}: modules: {len(modules)} modules ({', '.join(map(str, modules))}) — merger merges "
                          f"one module per recipe; write one recipe per module, or use top-level slices/models")
    if "slices" in data or "models" in data:
        raise RecipeError(f"{path}: modules: give `modules` or top-level `slices`/`models`, not both")
    (name, module), = modules.items()
    if not isinstance(module, dict) or set(module) - {"slices", "models", "parameters"}:
        extra = sorted(set(module) - {"slices", "models", "parameters"}) if isinstance(module, dict) else ["?"]
        raise RecipeError(f"{path}: modules.{name}: {extra[0]!r} is not a module field; a module has slices or "
                          f"models, and parameters")
    out = {k: v for k, v in data.items() if k != "modules"}
    out.update({k: v for k, v in module.items() if k != "parameters"})
    if module.get("parameters"):
        out["parameters"] = {**(data.get("parameters") or {}), **module["parameters"]}
    return out


def load_recipe_plugins(data: dict[str, Any], path: str | Path, folder: Path | None = None) -> None:
    """Load the recipe's `plugins:` files before its names are checked against the registries;
    relative paths start from the recipe's folder, so a recipe and its plugin travel together."""
    folder = Path(path).parent if folder is None else folder
    files = data.get("plugins")
    if files is None:
        return
    if not isinstance(files, list) or not all(isinstance(f, str) and f.strip() for f in files):
        raise RecipeError(f"{path}: plugins: give a list of .py files (relative to the recipe's folder)")
    for i, name in enumerate(files):
        try:
            file = Path(name).expanduser()
            plugins.load_plugin_file(file if file.is_absolute() else folder / file)
        except PluginError as e:
            raise PluginError(f"{path}: plugins[{i}]: {e}") from None
        except (RuntimeError, OSError) as e:  # ~nosuchuser/x.py
            raise RecipeError(f"{path}: plugins[{i}]: cannot use {name!r} ({e})") from None


def unknown_name(path: str | Path, field: str, kind: str, name: str, registry: dict[str, type]) -> RecipeError:
    """The error for a name no plugin registered, listing the registered ones."""
    return RecipeError(f"{path}: {field}: unknown {kind} {name!r}; registered: {', '.join(sorted(registry))} "
                       f"(a plugin's {kind} needs its package installed, or its .py file under `plugins:`)")


def merge_groups(recipe: MergeRecipe) -> list[tuple[str, Level, list[tuple[str, str, Level]]]]:
    """(slice location, slice level, [(location, model reference, per-model level)]) per slice;
    a `models:` recipe is one group without a slice level."""
    if recipe.models is not None:
        return [("", Level("", {}), [(f"models[{i}]", m.model, Level(f"models[{i}].parameters", m.parameters))
                                     for i, m in enumerate(recipe.models)])]
    return [(f"slices[{si}]", Level(f"slices[{si}].parameters", s.parameters),
             [(f"slices[{si}].sources[{j}]", src.model, Level(f"slices[{si}].sources[{j}].parameters", src.parameters))
              for j, src in enumerate(s.sources)])
            for si, s in enumerate(recipe.slices or [])]


def validate_merge_recipe(recipe: MergeRecipe, path: str | Path) -> None:
    """Check the method, its parameter names, every value each parameter can take, model counts and
    requiredness, by YAML path. Per-tensor checks (gradients at each layer, filters, cross-field
    rules) follow in the planner, which `validate` runs too."""
    registry = plugins.methods()
    if recipe.merge_method not in registry:
        raise unknown_name(path, "merge_method", "method", recipe.merge_method, registry)
    method = registry[recipe.merge_method]
    gfields, mfields = fields_of(method.Params), fields_of(method.ModelParams)

    others = method_parameter_keys()

    def check(level: Level, allow_global: bool) -> None:
        for key, value in list(level.params.items()):
            loc = f"{level.where}.{key}"
            field = mfields.get(key) or (gfields.get(key) if allow_global else None)
            if field is None and key in gfields:
                raise RecipeError(f"{path}: {loc}: {key!r} is one value per tensor for {method.name}, not per model; "
                                  f"put it in the top-level (or the slice's) `parameters:`")
            if field is None and key in others:  # mergekit ignores what a method does not use: so do we, aloud
                warn(f"{path}: {loc}: {method.name} does not use {key!r} (it is a parameter of "
                     f"{', '.join(sorted(others[key])[:3])}); ignored")
                del level.params[key]
                continue
            if field is None:
                known = sorted({f.key for f in mfields.values()} | ({f.key for f in gfields.values()} if allow_global else set()))
                near = (difflib.get_close_matches(key, known, n=1, cutoff=0.7)
                        or difflib.get_close_matches(key, sorted(others), n=1, cutoff=0.7))
                hint = f"did you mean {near[0]!r}? " if near else ""
                scope = "" if allow_global else " per model"
                raise RecipeError(f"{path}: {loc}: {method.name} has no parameter {key!r}{scope}; {hint}"
                                  f"known: {', '.join(known) or 'none'}")
            check_points(path, loc, field, value)

    top = Level("parameters", recipe.parameters)
    check(top, True)
    base = method_base(recipe, method)
    if recipe.base_model is not None and base is None:  # mergekit ignores it there, except as the config donor
        warn(f"{path}: base_model: {method.name} merges no base model; {recipe.base_model!r} only gives the output "
             f"its config.json and tokenizer")
    has_base = base is not None
    for where, slice_level, members in merge_groups(recipe):
        check(slice_level, True)
        for _loc, _ref, level in members:
            check(level, False)
        inputs = [(loc, level) for loc, ref, level in members if method.base_is_input or ref != base]
        if method.base_is_input and has_base and base not in [r for _, r, _ in members]:
            inputs.append(("base_model", Level("base_model", {})))
        try:
            method.check_models(len(inputs), has_base)
        except ValueError as e:
            raise RecipeError(f"{path}: {where + '.' if where else ''}merge_method: {e}") from None
        for loc, level in inputs:
            for f in set(mfields.values()):
                if f.required and not f.given(level.params, slice_level.params, recipe.parameters):
                    raise RecipeError(f"{path}: {loc}.parameters.{f.key}: required by {method.name}; "
                                      f"set it per model or in the top-level parameters")
    for f in set(gfields.values()):
        if f.required and not (f.given(recipe.parameters) or (
                recipe.slices and all(f.given(s.parameters) for s in recipe.slices))):
            raise RecipeError(f"{path}: parameters.{f.key}: required by {method.name}")


def method_base(recipe: MergeRecipe, method: type) -> str | None:
    """The base model the method merges with: base_model, unless the method takes none."""
    if method.base == "none" and not method.base_is_input:
        return None
    return recipe.base_model


def check_points(path: str | Path, loc: str, field: Any, value: ParamValue) -> None:
    """Every concrete value a parameter can produce (each gradient point, each filter entry) fits the field."""
    for v in value.points():
        problem = field.check(v)
        if problem:
            raise RecipeError(f"{path}: {loc}: {problem} (got {v!r})")
