"""Every bad input gives one line naming the file/field and what to do, exit 1, no traceback,
and no output folder (or temp folder) left behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merger import synth
from merger.cli import app

from cli_checks import assert_one_line_error

runner = CliRunner()


def run_build(tmp_path: Path, recipe: dict | str, *extra: str) -> tuple[int, str, Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    out = tmp_path / "out"
    res = runner.invoke(app, ["build", str(path), str(out), "-q", *extra])
    return res.exit_code, res.stderr, out


def lin(*models: Path, **params) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            **params}


def test_invalid_yaml(tmp_path):
    assert_one_line_error(*run_build(tmp_path, "merge_method: linear\nmodels: [a, b\n"), "recipe.yaml",
                          "invalid YAML", "line")


def test_recipe_not_a_mapping(tmp_path):
    assert_one_line_error(*run_build(tmp_path, "- a\n- b\n"), "YAML mapping")


def test_missing_recipe_file(tmp_path):
    res = runner.invoke(app, ["build", str(tmp_path / "nope.yaml"), str(tmp_path / "out")])
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "out", "nope.yaml", "not found")


def test_unknown_method_lists_known(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"])
    r["merge_method"] = "lineer"
    assert_one_line_error(*run_build(tmp_path, r), "merge_method", "lineer", "linear", "task_arithmetic")


def test_unknown_parameter_names_yaml_path(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"], tiny_models["ft_b"])
    r["models"][1]["parameters"]["wieght"] = 1
    assert_one_line_error(*run_build(tmp_path, r), "models[1].parameters.wieght", "weight")


def test_bad_parameter_value(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"])
    r["models"][0]["parameters"]["weight"] = "heavy"
    assert_one_line_error(*run_build(tmp_path, r), "models[0].parameters.weight", "heavy")


def test_missing_required_parameter(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"])
    del r["models"][0]["parameters"]["weight"]
    assert_one_line_error(*run_build(tmp_path, r), "models[0].parameters.weight", "required")


def test_unknown_top_level_field(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"])
    r["merge_methd"] = "x"
    assert_one_line_error(*run_build(tmp_path, r), "merge_methd", "unknown field")


def test_missing_model_folder(tmp_path, tiny_models):
    assert_one_line_error(*run_build(tmp_path, lin(tiny_models["ft_a"], tmp_path / "ghost")), "ghost")


def test_missing_config(tmp_path, tiny_models):
    bad = tmp_path / "noconfig"
    shutil.copytree(tiny_models["ft_a"], bad)
    (bad / "config.json").unlink()
    assert_one_line_error(*run_build(tmp_path, lin(tiny_models["ft_a"], bad)), "config.json")


def test_missing_tensor_in_one_input(tmp_path, tiny_models):
    weights = synth.random_weights(synth.llama_config(), seed=9)
    del weights["model.layers.2.mlp.up_proj.weight"]
    synth.write_checkpoint(tmp_path / "holey", synth.llama_config(), weights)
    assert_one_line_error(*run_build(tmp_path, lin(tiny_models["ft_a"], tmp_path / "holey")),
                          "holey", "model.layers.2.mlp.up_proj.weight")


def test_shape_mismatch(tmp_path, tiny_models):
    synth.make_llama(tmp_path / "wide", seed=1, intermediate=96)
    assert_one_line_error(*run_build(tmp_path, lin(tiny_models["ft_a"], tmp_path / "wide")),
                          "shape mismatch", "[64, 96]", "[64, 128]")


def test_layer_range_out_of_bounds(tmp_path, tiny_models):
    r = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny_models["ft_a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tiny_models["ft_b"]), "layer_range": [2, 9]}]}]}
    assert_one_line_error(*run_build(tmp_path, r), "slices[1].sources[0].layer_range", "4 layers")


def test_layer_range_backwards(tmp_path, tiny_models):
    r = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny_models["ft_a"]), "layer_range": [3, 1]}]}]}
    assert_one_line_error(*run_build(tmp_path, r), "slices[0].sources[0].layer_range")


def test_task_arithmetic_without_base(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"])
    r["merge_method"] = "task_arithmetic"
    assert_one_line_error(*run_build(tmp_path, r), "merge_method", "base_model")


def test_passthrough_two_models(tmp_path, tiny_models):
    r = {"merge_method": "passthrough", "models": [{"model": str(tiny_models["ft_a"])},
                                                   {"model": str(tiny_models["ft_b"])}]}
    assert_one_line_error(*run_build(tmp_path, r), "passthrough", "exactly 1")


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "huge_length"])
def test_corrupt_safetensors_header(tmp_path, tiny_models, damage):
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_models["ft_a"], bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[:5])
    elif damage == "garbage_header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    assert_one_line_error(*run_build(tmp_path, lin(tiny_models["ft_a"], bad)), "model.safetensors",
                          "safetensors")


def test_output_exists_needs_force(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a previous output
    (out / "keep.txt").write_text("mine")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(lin(tiny_models["ft_a"])))
    res = runner.invoke(app, ["build", str(path), str(out), "-q"])
    assert res.exit_code == 1 and "already exists" in res.stderr and "--force" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"
    res = runner.invoke(app, ["build", str(path), str(out), "-q", "--force"])
    assert res.exit_code == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_force_never_replaces_a_folder_that_is_not_a_model_output(tmp_path, tiny_models):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(lin(tiny_models["ft_a"])))
    res = runner.invoke(app, ["build", str(path), str(out), "-q", "--force"])
    assert res.exit_code == 1 and "not a model output" in res.stderr and "todo.txt" in res.stderr, res.stderr
    assert (out / "todo.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["todo.txt"]


def test_failure_midway_leaves_nothing(tmp_path, tiny_models):
    """An input whose header is fine but whose data is cut short fails during the merge itself."""
    bad = tmp_path / "short"
    shutil.copytree(tiny_models["ft_b"], bad)
    f = bad / "model.safetensors"
    n = int.from_bytes(f.read_bytes()[:8], "little")
    header = json.loads(f.read_bytes()[8:8 + n])
    last = max(header.values(), key=lambda v: v.get("data_offsets", [0, 0])[1] if isinstance(v, dict) else 0)
    assert last
    # Keep the header but shrink the file so only the last tensor's bytes are missing.
    f.write_bytes(f.read_bytes()[: 8 + n + last["data_offsets"][0]])
    assert_one_line_error(*run_build(tmp_path, lin(tiny_models["ft_a"], bad)), "short")


def test_bad_shard_size(tmp_path, tiny_models):
    assert_one_line_error(*run_build(tmp_path, lin(tiny_models["ft_a"]), "--out-shard-size", "lots"),
                          "--out-shard-size")


def test_validate_reads_no_tensor(tmp_path, tiny_models, monkeypatch):
    from merger.io.checkpoint import Checkpoint

    def no_reads(self, name):
        raise AssertionError(f"validate read tensor {name}")

    monkeypatch.setattr(Checkpoint, "get", no_reads)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(lin(tiny_models["ft_a"], tiny_models["ft_b"])))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "ok (linear)" in res.stdout and "2 models, 4 layers" in res.stdout, res.output


def test_validate_resolves_every_reference(tmp_path, tiny_models):
    """A model that does not exist fails `validate` as it fails `build`, with the same line."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(lin(tiny_models["ft_a"], tmp_path / "not-there-yet")))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 1 and "not-there-yet" in res.stderr
    built = runner.invoke(app, ["build", str(path), str(tmp_path / "out"), "-q"])
    assert built.exit_code == 1 and built.stderr == res.stderr


def test_unreadable_output_parent(tmp_path, tiny_models):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(lin(tiny_models["ft_a"])))
    res = runner.invoke(app, ["build", str(path), str(blocker / "out"), "-q"])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "error:" in res.stderr


@pytest.mark.parametrize("args, needles", [
    (["generate", "model", "hi", "-n", "abc"], ["--max-new-tokens", "valid integer", "merger generate --help"]),
    (["build"], ["Missing argument", "merger build --help"]),
    (["bogus"], ["No such command 'bogus'"]),
    (["build", "r.yaml", "out", "--frobnicate"], ["No such option", "--frobnicate"]),
    (["generate", "m", "hi", "--top-k", "1.5"], ["--top-k"]),
])
def test_usage_errors_are_one_line(tmp_path, args, needles):
    """typer's own errors (it carries its own copy of click) end like every other: one line, exit 1."""
    res = runner.invoke(app, args)
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "out", *needles)


def test_usage_errors_in_the_real_executable(tmp_path):
    import subprocess
    import sys

    code = "import sys; from merger.cli import main; sys.argv[0] = 'merger'; main()"
    res = subprocess.run([sys.executable, "-c", code, "generate", "m", "hi", "-n", "abc"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0 and "Usage" in bare.stdout
