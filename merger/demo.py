"""`merger demo`: the whole pipeline offline on tiny seeded checkpoints — write a base and three
fine-tunes, build every recipe in recipes/ against them, show the demo MoE's routing, and
generate from it with the bundled engine (the tiny models are random: expect gibberish)."""
from __future__ import annotations

from pathlib import Path

import merger
from merger import synth
from merger.errors import MergerError
from merger.pipeline import build_recipe
from merger.recipe_file import load_recipe

MODEL_NAMES = ("base", "ft-a", "ft-b", "ft-c")
ROUTE_PROMPTS = ("def add(a, b):", "Once upon a time")  # routed through the demo MoE


def find_recipes() -> Path:
    for cand in (Path.cwd() / "recipes", Path(merger.__file__).resolve().parent.parent / "recipes"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    raise MergerError("no recipes/ folder found; run `merger demo` from a clone of the merger repository")


def make_demo_models(root: Path, **config_kw) -> dict[str, Path]:
    """A seeded base and three fine-tunes (base + noise) under root/models."""
    models = root / "models"
    base = synth.make_llama(models / "base", seed=0, **config_kw)
    for k, name in enumerate(MODEL_NAMES[1:], start=1):
        synth.make_llama(models / name, seed=k, base=base, **config_kw)
    return {name: models / name for name in MODEL_NAMES}


def run_demo(root: Path, recipes: Path | None = None, echo=print) -> list[Path]:
    root = Path(root)
    recipes = recipes or find_recipes()
    make_demo_models(root)
    echo(f"made seeded checkpoints in {root / 'models'}: {', '.join(MODEL_NAMES)}")
    outs = []
    for recipe_path in sorted(recipes.glob("*.yaml")):
        recipe = load_recipe(recipe_path)
        out = root / "out" / recipe_path.stem
        build_recipe(recipe, out, force=True, options={"base_dir": str(root)}, label=str(recipe_path),
                     progress=False)
        echo(f"built {recipe_path.name} -> {out}")
        outs.append(out)
    moe_out = root / "out" / "moe"
    if moe_out in outs:  # recipes/moe.yaml: show where its router sends two prompts
        from merger.moe.route import format_report, route_report

        echo(f"routing in {moe_out}:\n" + format_report(route_report(moe_out, list(ROUTE_PROMPTS))))
    from merger.evaluate.report import demo_table

    echo("merger eval of the inputs and the merges it built (perplexity per built-in text):\n"
         + demo_table(root, outs, max_chars=600))
    return outs
