"""The MoE recipe (mergekit-moe's YAML format, unchanged) and `load_moe_recipe`, which checks gate
mode, experts_per_token, prompts and output architecture before any model is opened.
Errors are RecipeErrors carrying the YAML path (`experts[1].positive_prompts`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from merger import plugins
from merger.errors import RecipeError, warn
from merger.params import fields_of
from merger.recipe import DtypeName, Float, Int, ModelRef, RecipeModel, parse_model, unknown_name

# The output layouts merger writes, under the names mergekit-moe gives them and in its order of preference.
# As in mergekit, `architecture:` names every layout whose name starts with it (case-insensitive: "qwen" is
# both Qwen ones), and the recipe's shared_experts and the input models' type then pick one of those.
LAYOUT_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen MoE", "qwen3_moe": "Qwen3 MoE"}
NEEDS_SHARED = {"mixtral": False, "qwen2_moe": True, "qwen3_moe": False}  # Qwen2-MoE: exactly one shared expert
# merger's own spellings, accepted as exact names
ALIASES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen2moe": "qwen2_moe", "qwen2-moe": "qwen2_moe",
           "qwen2": "qwen2_moe", "qwen3_moe": "qwen3_moe", "qwen3moe": "qwen3_moe", "qwen3-moe": "qwen3_moe"}


def named_layouts(architecture: str | None) -> list[str]:
    """The layouts `architecture` names, in mergekit's order; all of them when it is unset or empty."""
    if not architecture:
        return list(LAYOUT_NAMES)
    name = architecture.lower()
    if name.strip() in ALIASES:
        return [ALIASES[name.strip()]]
    return [k for k, title in LAYOUT_NAMES.items() if title.lower().startswith(name)]


class Expert(RecipeModel):
    """One expert (or shared expert): a source model, its prompts and mergekit's two weight knobs."""

    source_model: ModelRef
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    # N(0, noise_scale²) added to each of the expert's MLP tensors (seeded by --random-seed)
    noise_scale: Float | None = Field(default=None, ge=0, le=1e3)
    # multiplies the expert's down projection, i.e. scales its contribution to the residual stream
    residual_scale: Float | None = Field(default=None, ge=-1e3, le=1e3)


class MoERecipe(RecipeModel):
    """A mergekit-moe recipe: base_model donates everything but the MLPs; experts donate MLPs."""

    base_model: ModelRef
    experts: list[Expert]
    gate_mode: str = "hidden"
    gate_parameters: dict[str, Any] = Field(default_factory=dict)
    experts_per_token: Int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    # mergekit-moe's `dtype` is the output dtype; out_dtype (mergekit's merge key) overrides it
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    tokenizer_source: ModelRef | None = None
    name: str | None = None
    plugins: list[str] = Field(default_factory=list)

    @field_validator("experts")
    @classmethod
    def _some_experts(cls, v: list[Expert]) -> list[Expert]:
        if not v:
            raise ValueError("no experts; list at least one (source_model, positive_prompts)")
        return v

    # --- helpers used by the composer and the CLI ----------------------------------------
    @property
    def shared(self) -> Expert | None:
        return self.shared_experts[0] if self.shared_experts else None

    def candidate_layouts(self) -> list[str]:
        """The layouts this recipe allows before any model is opened: those `architecture` names that take its
        shared_experts. merger.moe.layout.choose_layout picks one by the input models' type."""
        return [k for k in named_layouts(self.architecture) if NEEDS_SHARED[k] == bool(self.shared)]

    @property
    def output_architecture(self) -> str:
        """The first candidate layout: 'mixtral', 'qwen2_moe' or 'qwen3_moe' (validated by load_moe_recipe).
        plan_moe hands the card a copy whose `architecture` names the layout the inputs settled on."""
        return self.candidate_layouts()[0]

    def tokenizer_ref(self) -> str:
        return self.base_model if self.tokenizer_source in (None, "base") else self.tokenizer_source

    def model_refs(self) -> list[str]:
        """Every distinct model reference, base first."""
        refs = [self.base_model] + [e.source_model for e in self.experts]
        refs += [e.source_model for e in self.shared_experts or []]
        refs.append(self.tokenizer_ref())
        return list(dict.fromkeys(refs))

    def gate_rows(self) -> list[tuple[str, Expert]]:
        """(YAML path, expert) for every router row to initialise: experts, then the shared expert."""
        rows = [(f"experts[{j}]", e) for j, e in enumerate(self.experts)]
        if self.shared:
            rows.append(("shared_experts[0]", self.shared))
        return rows


def load_moe_recipe(data: dict[str, Any], path: str | Path) -> MoERecipe:
    """Validate an MoE recipe mapping; RecipeError (with the YAML path) on the first problem."""
    recipe = parse_model(MoERecipe, data, path)
    assert isinstance(recipe, MoERecipe)
    validate_moe_recipe(recipe, path)
    return recipe


def validate_moe_recipe(recipe: MoERecipe, path: str | Path) -> None:
    registry = plugins.gate_initializers()
    if recipe.gate_mode not in registry:
        raise unknown_name(path, "gate_mode", "gate initializer", recipe.gate_mode, registry)
    gate = registry[recipe.gate_mode]
    fields = fields_of(gate.Params)
    for key, value in recipe.gate_parameters.items():
        problem = fields[key].check(value) if key in fields else None
        if problem:
            raise RecipeError(f"{path}: gate_parameters.{key}: {problem} (got {value!r})")
    try:
        gate.Params.model_validate(recipe.gate_parameters)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"]))
        known = ", ".join(gate.Params.model_fields) or "none"
        raise RecipeError(f"{path}: gate_parameters{'.' + loc if loc else ''}: "
                          f"{err['msg'].removeprefix('Value error, ')} (gate_mode {gate.name} takes: {known})") from None

    n = len(recipe.experts)
    if not 1 <= recipe.experts_per_token <= n:
        raise RecipeError(f"{path}: experts_per_token: {recipe.experts_per_token} must be between 1 and the "
                          f"number of experts ({n})")

    if recipe.shared_experts is not None and len(recipe.shared_experts) > 1:
        raise RecipeError(f"{path}: shared_experts: {len(recipe.shared_experts)} given, but the Qwen2-MoE layout "
                          f"holds one shared expert; keep one")
    _check_architecture(recipe, path)

    if recipe.tokenizer_source == "union":
        raise RecipeError(f"{path}: tokenizer_source: 'union' would change the vocabulary, but an MoE keeps the "
                          f"base model's embeddings; use 'base' or a model with the same vocabulary")

    for where, e in recipe.gate_rows():
        if e.negative_prompts and not e.positive_prompts:
            raise RecipeError(f"{path}: {where}.negative_prompts: given without positive_prompts; "
                              f"add positive_prompts for this expert")
    if not gate.needs_prompts:
        return
    empty = [where for where, e in recipe.gate_rows() if not e.positive_prompts]
    if len(empty) == len(recipe.gate_rows()):
        warn(f"{path}: no expert has positive_prompts, so gate_mode {gate.name!r} gives every router row zero: "
             f"routing is uniform until the router is trained (gate_mode: random is the usual choice for that)")
    elif empty:
        warn(f"{path}: {', '.join(empty)}: no positive_prompts, so the router row is zero there (that expert is "
             f"chosen only when the others score below zero) until the router is trained")
    groups: dict[tuple, list[str]] = {}
    for where, e in recipe.gate_rows():
        if e.positive_prompts:
            groups.setdefault(_prompt_key(e), []).append(where)
    for same in (g for g in groups.values() if len(g) > 1):
        warn(f"{path}: {' and '.join(same)} have the same prompts, so their router rows are equal: the router "
             f"cannot tell them apart until it is trained; give each expert prompts for what it should handle")


def _prompt_key(e: Expert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())


def _check_architecture(recipe: MoERecipe, path: str | Path) -> None:
    arch = recipe.architecture
    named = named_layouts(arch)
    if not named:
        other = " (mergekit's DeepSeek MoE is not one)" if arch and "deepseek moe".startswith(arch.lower()) else ""
        raise RecipeError(f"{path}: architecture: {arch!r} is not an output merger writes{other}; use mixtral "
                          f"(no shared expert), qwen (Qwen2-MoE, one shared expert) or qwen3 (Qwen3-MoE, none)")
    if recipe.candidate_layouts():
        return
    titles = " / ".join(LAYOUT_NAMES[k] for k in named)
    if recipe.shared:
        raise RecipeError(f"{path}: shared_experts: {titles} has no shared expert; remove shared_experts or set "
                          f"architecture: qwen")
    raise RecipeError(f"{path}: architecture: {arch!r} ({titles}) needs exactly one entry in shared_experts; "
                      f"add one or use architecture: mixtral")
