"""merger: merge LLM checkpoints and compose them into Mixture-of-Experts models."""
from __future__ import annotations

from merger.errors import MergerError
from merger.hookspecs import hookimpl
from merger.methods.base import MergeMethod
from merger.moe.base import GateInitializer
from merger.recipe_file import load_recipe

__all__ = ["hookimpl", "load_recipe", "build", "MergeMethod", "GateInitializer", "MergerError"]
__version__ = "0.1.0"


def build(recipe_path, out_dir, **kwargs):
    """Load a recipe and build it into `out_dir` (see `merger.pipeline.build_recipe` for options)."""
    from merger.pipeline import build_recipe

    return build_recipe(load_recipe(recipe_path), out_dir, **kwargs)
