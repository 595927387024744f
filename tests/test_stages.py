"""Multi-stage recipe files (mergekit-multi): the stages build in dependency order, equal to building
them by hand byte for byte, an unchanged stage is reused, and the whole file is checked first.
Also mergekit's single-module `modules:` form."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merger.cli import app

from cli_checks import assert_one_line_error

runner = CliRunner()


def docs(*recipes: dict) -> str:
    return "\n---\n".join(yaml.safe_dump(r, sort_keys=False) for r in recipes)


def first(m) -> dict:
    return {"name": "first-merge", "merge_method": "linear",
            "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
                       {"model": str(m["ft_b"]), "parameters": {"weight": 0.5}}]}


def second(m, ref: str = "first-merge") -> dict:
    return {"merge_method": "ties", "base_model": str(m["base"]),
            "models": [{"model": ref, "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(m["ft_c"]), "parameters": {"weight": 0.4, "density": 0.5}}]}


def build(tmp_path: Path, text: str, out: str = "out", *extra: str):
    (tmp_path / "pipe.yaml").write_text(text)
    return runner.invoke(app, ["build", str(tmp_path / "pipe.yaml"), str(tmp_path / out), "-q", *extra])


def weights_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_two_stages_equal_building_them_by_hand(tmp_path, tiny_models):
    m = tiny_models
    res = build(tmp_path, docs(first(m), second(m)))
    assert res.exit_code == 0, res.output
    stage = tmp_path / "out.stages" / "first-merge"
    assert (stage / "config.json").is_file() and (tmp_path / "out" / "config.json").is_file()
    # by hand: the first recipe alone, then the second with the folder in place of the name
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({k: v for k, v in first(m).items()}))
    assert runner.invoke(app, ["build", str(tmp_path / "a.yaml"), str(tmp_path / "hand" / "first-merge"), "-q"]).exit_code == 0
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(second(m, str(tmp_path / "hand" / "first-merge"))))
    assert runner.invoke(app, ["build", str(tmp_path / "b.yaml"), str(tmp_path / "hand" / "out"), "-q"]).exit_code == 0
    assert weights_bytes(stage) == weights_bytes(tmp_path / "hand" / "first-merge")
    assert weights_bytes(tmp_path / "out") == weights_bytes(tmp_path / "hand" / "out")
    # the final output keeps the whole file as its recipe
    assert (tmp_path / "out" / "merger_config.yml").read_text().count("---") == 1


def test_an_unchanged_stage_is_not_rebuilt(tmp_path, tiny_models):
    m = tiny_models
    text = docs(first(m), second(m))
    assert build(tmp_path, text).exit_code == 0
    shard = tmp_path / "out.stages" / "first-merge" / "model.safetensors"
    before = os.stat(shard)
    res = build(tmp_path, text, "out", "--force")
    assert res.exit_code == 0 and "unchanged since its last build, reused" in res.stderr, res.stderr
    after = os.stat(shard)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # a changed stage recipe is rebuilt
    changed = first(m)
    changed["models"][0]["parameters"]["weight"] = 0.7
    res = build(tmp_path, docs(changed, second(m)), "out", "--force")
    assert res.exit_code == 0 and "building into" in res.stderr
    assert os.stat(shard).st_ino != before.st_ino


def test_stages_are_built_in_dependency_order(tmp_path, tiny_models):
    """The final (unnamed) document may come first; a stage may use a later one."""
    m = tiny_models
    final = second(m, "mid")
    mid = {"name": "mid", "merge_method": "linear", "models": [{"model": "first-merge", "parameters": {"weight": 1.0}}]}
    res = build(tmp_path, docs(final, mid, first(m)))
    assert res.exit_code == 0, res.output
    assert res.stderr.index("'first-merge'") < res.stderr.index("'mid'")
    res = runner.invoke(app, ["plan", str(tmp_path / "pipe.yaml")])
    assert res.exit_code == 0
    lines = [ln for ln in res.stdout.splitlines() if not ln.startswith(" ")]
    assert lines == ["stage 'first-merge'", "stage 'mid', uses 'first-merge'", "document 1 (final), uses 'mid'"]


def test_validate_and_plan_show_the_stages(tmp_path, tiny_models):
    m = tiny_models
    (tmp_path / "pipe.yaml").write_text(docs(first(m), second(m)))
    res = runner.invoke(app, ["validate", str(tmp_path / "pipe.yaml")])
    assert res.exit_code == 0 and "ok (2 stages" in res.stdout and "stage 'first-merge'" in res.stdout, res.output
    res = runner.invoke(app, ["plan", str(tmp_path / "pipe.yaml"), "--tensors"])
    assert res.exit_code == 0 and "model.layers.0.mlp.up_proj.weight [128, 64] float32 <- first-merge:" in res.stdout
    assert not (tmp_path / "out.stages").exists()


@pytest.mark.parametrize("make, needles", [
    (lambda m: docs(first(m), second(m, "frist-merge")), ["'frist-merge'", "the stages of this file are 'first-merge'"]),
    (lambda m: docs({**first(m), "name": None}, {**second(m), "name": None}), ["documents 1, 2 have no name"]),
    (lambda m: docs(first(m), {**second(m), "name": "first-merge"}), ["'first-merge' is used by two documents"]),
    (lambda m: docs({**first(m), "models": [{"model": "b", "parameters": {"weight": 1}}]},
                    {"name": "b", "merge_method": "linear",
                     "models": [{"model": "first-merge", "parameters": {"weight": 1}}]}, second(m)),
     ["use each other in a cycle"]),
    (lambda m: docs({"name": "user", "merge_method": "linear", "models": [{"model": "fin", "parameters": {"weight": 1}}]},
                    first(m), {**second(m), "name": "fin"}),
     ["the final stage (stage 'fin') is used by stage 'user'"]),
    (lambda m: docs({**first(m), "name": "a/b"}, second(m, "a/b")), ["must be a plain folder name"]),
    (lambda m: docs(first(m), {**second(m), "parameters": {"lambda": float("nan")}}), ["document 2", "parameters.lambda"]),
])
def test_bad_pipelines_fail_before_anything_is_built(tmp_path, tiny_models, make, needles):
    res = build(tmp_path, make(tiny_models))
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "out", *needles)
    assert not (tmp_path / "out.stages").exists()
    val = runner.invoke(app, ["validate", str(tmp_path / "pipe.yaml")])
    assert val.exit_code == 1 and val.stderr == res.stderr


def test_single_module_form_equals_slices(tmp_path, tiny_models):
    m = tiny_models
    slices = [{"sources": [{"model": str(m["ft_a"]), "layer_range": [0, 2]}]},
              {"sources": [{"model": str(m["ft_b"]), "layer_range": [1, 4]}]}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": slices}))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough",
                                                     "modules": {"default": {"slices": slices}}}))
    for name in ("s", "m"):
        res = runner.invoke(app, ["build", str(tmp_path / f"{name}.yaml"), str(tmp_path / name / "o"), "-q"])
        assert res.exit_code == 0, res.output
    assert weights_bytes(tmp_path / "s" / "o") == weights_bytes(tmp_path / "m" / "o")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": slices}, "vision_tower": {"slices": slices}}}))
    res = runner.invoke(app, ["build", str(tmp_path / "two.yaml"), str(tmp_path / "two"), "-q"])
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "two", "modules: 2 modules", "one module per recipe")
