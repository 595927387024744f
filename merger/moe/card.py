"""The model card (README.md) written into an MoE output: base, experts and their prompts, gate
mode, experts per token, and the recipe itself."""
from __future__ import annotations

import yaml

from merger.card import recipe_block, scrub
from merger.moe.layout import ARCH_NAMES
from merger.moe.recipe import Expert, MoERecipe


def _quote(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "\\n") + "`"


def _expert_lines(title: str, e: Expert) -> list[str]:
    lines = [f"### {title}: {_quote(e.source_model)}", ""]
    for label, prompts in (("positive prompts", e.positive_prompts), ("negative prompts", e.negative_prompts)):
        if prompts:
            lines.append(f"- {label}: " + ", ".join(_quote(p) for p in prompts))
    if e.noise_scale is not None:
        lines.append(f"- noise_scale: {e.noise_scale} (Gaussian noise added to its MLP weights)")
    if e.residual_scale is not None:
        lines.append(f"- residual_scale: {e.residual_scale} (its down projection is scaled by this)")
    if len(lines) == 2:
        lines.append("- no prompts")
    return lines + [""]


def model_card(recipe: MoERecipe, recipe_text: str | None, seed: int) -> str:
    arch = recipe.output_architecture
    title = recipe.name or f"{len(recipe.experts)}-expert {ARCH_NAMES[arch].removesuffix('ForCausalLM')} MoE"
    lines = [
        "---", "tags: [merge, moe, merger]", "---", "", f"# {title}", "",
        f"A clown-car Mixture of Experts built with merger: attention, norms, embeddings and lm_head come "
        f"from the base model; each expert contributes its MLP. Layout: `{ARCH_NAMES[arch]}`.", "",
        f"- base model: {_quote(recipe.base_model)}",
        f"- gate mode: `{recipe.gate_mode}`" + (f" (random seed {seed})" if "random" in recipe.gate_mode else ""),
        f"- experts per token: {recipe.experts_per_token} of {len(recipe.experts)}",
        "",
    ]
    if recipe.gate_parameters:
        lines[-1:] = [f"- gate parameters: `{recipe.gate_parameters}`", ""]
    lines += ["## Experts", ""]
    for j, e in enumerate(recipe.experts):
        lines += _expert_lines(f"Expert {j}", e)
    if recipe.shared:
        lines += _expert_lines("Shared expert (always active, sigmoid gate)", recipe.shared)
    text = recipe_text if recipe_text is not None else yaml.safe_dump(
        recipe.model_dump(exclude_none=True), sort_keys=False)
    lines += ["## Recipe", "", *recipe_block(text), ""]
    return "\n".join(lines)


def card_text(recipe: MoERecipe, seed: int) -> str:
    """The card, scrubbed: local absolute paths become their last component, tokens vanish (cards get published)."""
    text = getattr(recipe, "_source_text", None)
    return scrub(model_card(recipe, text, seed), recipe.model_refs() + recipe.plugins)
