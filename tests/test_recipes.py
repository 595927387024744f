"""Every canonical recipe in recipes/ loads, validates and builds against the demo checkpoints;
mergekit-format recipes run unchanged (only model references differ)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from merger.pipeline import build_recipe
from merger.recipe import MergeRecipe
from merger.recipe_file import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds(path, demo_root, tmp_path):
    recipe = load_recipe(path)
    out = build_recipe(recipe, tmp_path / "out", options={"base_dir": str(demo_root)}, progress=False)
    assert (out / "config.json").is_file() and (out / "merger_config.yml").read_text() == path.read_text()


def test_mergekit_readme_linear_recipe_runs_unchanged(tmp_path, tiny_models, load_weights):
    text = f"""
models:
  - model: {tiny_models['ft_a']}
    parameters:
      weight: 1.0
  - model: {tiny_models['ft_b']}
    parameters:
      weight: 0.3
  - model: {tiny_models['ft_c']}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml")
    assert isinstance(recipe, MergeRecipe)
    out = build_recipe(recipe, tmp_path / "out", progress=False)
    got = load_weights(out)
    a, b, c = (load_weights(tiny_models[k]) for k in ("ft_a", "ft_b", "ft_c"))
    name = "model.layers.3.self_attn.o_proj.weight"
    ref = (a[name].half().float() + 0.3 * b[name].half().float() + 0.5 * c[name].half().float()) / 1.8
    # dtype float16 means fp16 compute: allow fp16 rounding of the accumulation.
    torch.testing.assert_close(got[name].float(), ref, rtol=2e-3, atol=2e-3)
    assert got[name].dtype == torch.float16


def test_recipe_yaml_round_trip_keeps_lambda_alias(tmp_path, tiny_models):
    r = {"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]), "parameters": {"lambda": 0.5},
         "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1.0}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    recipe = load_recipe(tmp_path / "r.yaml")
    assert {k: v.raw for k, v in recipe.parameters.items()} == {"lambda": 0.5}
