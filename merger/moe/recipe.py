"""The MoE recipe (mergekit-moe's YAML format, unchanged) and `load_moe_recipe`, which checks gate
mode, experts_per_token, prompts and output architecture before any model is opened.
Errors are RecipeErrors carrying the YAML path (`experts[1].positive_prompts`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from merger import plugins
from merger.errors import RecipeError
from merger.params import fields_of
from merger.recipe import DtypeName, Float, Int, ModelRef, RecipeModel, parse_model, unknown_name

# Output layouts we write; mergekit-moe's `architecture:` picks one by name prefix.
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen moe": "qwen2_moe", "qwen2_moe": "qwen2_moe",
                 "qwen2moe": "qwen2_moe", "qwen2-moe": "qwen2_moe"}


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

    @property
    def output_architecture(self) -> str:
        """'mixtral' or 'qwen2_moe' (validated by load_moe_recipe)."""
        if self.architecture:
            return ARCHITECTURES[self.architecture.strip().lower()]
        return "qwen2_moe" if self.shared else "mixtral"

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
        if gate.needs_prompts and not e.positive_prompts:
            raise RecipeError(f"{path}: {where}.positive_prompts: gate_mode {gate.name!r} needs at least one "
                              f"positive prompt per expert; add some, or use gate_mode: random")
    if gate.needs_prompts and n > 1:
        first = _prompt_key(recipe.experts[0])
        if all(_prompt_key(e) == first for e in recipe.experts[1:]):
            raise RecipeError(f"{path}: experts: every expert has the same prompts, so every router row would be "
                              f"the same; give each expert prompts for what it should handle")


def _prompt_key(e: Expert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())


def _check_architecture(recipe: MoERecipe, path: str | Path) -> None:
    arch = recipe.architecture
    if arch is not None and arch.strip().lower() not in ARCHITECTURES:
        raise RecipeError(f"{path}: architecture: {arch!r} is not an output merger writes; use mixtral "
                          f"(no shared expert) or qwen (Qwen2-MoE, one shared expert)")
    out = recipe.output_architecture
    if out == "mixtral" and recipe.shared:
        raise RecipeError(f"{path}: shared_experts: Mixtral has no shared expert; remove shared_experts or set "
                          f"architecture: qwen")
    if out == "qwen2_moe" and not recipe.shared:
        raise RecipeError(f"{path}: architecture: qwen (Qwen2-MoE) needs exactly one entry in shared_experts; "
                          f"add one or use architecture: mixtral")
