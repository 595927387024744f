"""Each input a fault-injection run found mishandled (a traceback, a hang, or silent acceptance) now
ends in one line naming what to fix, exit 1, nothing written; and `merger validate` gives the very
same line wherever the build fails before reading tensor data."""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from merger import synth
from merger.cli import app

from cli_checks import assert_one_line_error

runner = CliRunner()


def write(tmp_path: Path, recipe: dict | str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def fails_alike(tmp_path: Path, recipe: dict | str, *needles: str, validate_too: bool = True) -> str:
    """build fails with one line holding `needles`; validate fails with the same line (or, for faults in
    tensor data, which validate cannot see, passes)."""
    path = write(tmp_path, recipe)
    out = tmp_path / "out"
    res = runner.invoke(app, ["build", str(path), str(out), "-q"])
    assert_one_line_error(res.exit_code, res.stderr, out, *needles)
    val = runner.invoke(app, ["validate", str(path)])
    if validate_too:
        assert val.exit_code == 1 and val.stderr == res.stderr, (val.stderr, res.stderr)
    else:
        assert val.exit_code == 0, val.output
    return res.stderr


def lin(*models: Path, weight=1.0, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": weight}} for m in models],
            **extra}


def moe(m: dict[str, Path], a: dict | None = None, b: dict | None = None, **extra) -> dict:
    return {"base_model": str(m["base"]), "gate_mode": "random",
            "experts": [{"source_model": str(m["ft_a"]), **(a or {})}, {"source_model": str(m["ft_b"]), **(b or {})}],
            **extra}


# --- recipes --------------------------------------------------------------------------------------

def test_deeply_nested_yaml(tmp_path):
    fails_alike(tmp_path, "merge_method: linear\nmodels: " + "[" * 3000 + "]" * 3000 + "\n", "r.yaml", "nested")


def test_yaml_alias_bomb(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    fails_alike(tmp_path, "\n".join(lines) + "\nmerge_method: linear\n", "r.yaml", "expands to more than")


def test_duplicate_key(tmp_path, tiny_models):
    text = yaml.safe_dump(lin(tiny_models["ft_a"])) + "merge_method: ties\n"
    fails_alike(tmp_path, text, "r.yaml", "'merge_method' is given twice", "line")


@pytest.mark.parametrize("field", ["base_model", "tokenizer_source"])
def test_empty_reference(tmp_path, tiny_models, field):
    fails_alike(tmp_path, lin(tiny_models["ft_a"], **{field: ""}), f"{field}: is empty")


def test_home_of_an_unknown_user(tmp_path, tiny_models):
    fails_alike(tmp_path, lin(tiny_models["ft_a"], Path("~nosuchuser-merger/x")), "~nosuchuser-merger", "not a user")


@pytest.mark.parametrize("method, where, value, needle", [
    ("linear", "models[0].parameters.weight", True, "not the boolean true"),
    ("linear", "models[0].parameters.weight", float("nan"), "not a finite number"),
    ("linear", "models[0].parameters.weight", 1e300, "too large"),
    ("nearswap", "parameters.t", float("inf"), "not a finite number"),
    ("karcher", "parameters.tol", float("inf"), "not a finite number"),
    ("karcher", "parameters.max_iter", 1e9, "less than or equal to 100000"),
    ("nuslerp", "models[1].parameters.weight", float("-inf"), "not a finite number"),
    ("task_arithmetic", "models[0].parameters.density", [0.5, float("nan")], "not a finite number"),
])
def test_bad_numbers_name_their_field(tmp_path, tiny_models, method, where, value, needle):
    m = tiny_models
    r = {"merge_method": method, "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
                                           {"model": str(m["ft_b"]), "parameters": {"weight": 0.5}}]}
    if method in ("nearswap", "task_arithmetic"):
        r["base_model"] = str(m["base"])
        r["models"] = r["models"][:1] if method == "nearswap" else r["models"]
    if method == "nearswap":
        r["models"][0]["parameters"] = {}
        r["parameters"] = {"t": 0.1}
    if method == "karcher":
        r["models"] = [{"model": str(m["ft_a"])}, {"model": str(m["ft_b"])}]
    target = r
    *head, key = where.replace("]", "").replace("[", ".").split(".")
    for part in head:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[key] = value
    err = fails_alike(tmp_path, r, where, needle)
    assert "bug" not in err and "plugin" not in err


def test_interior_gradient_values_fail_in_validate(tmp_path, tiny_models):
    """della with density [0.5, 0.95]: the ends pass alone, density + epsilon > 1 at the last layers."""
    m = tiny_models
    r = {"merge_method": "della", "base_model": str(m["base"]),
         "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 1, "density": [0.5, 0.95]}}]}
    fails_alike(tmp_path, r, "models[0].parameters.density", "density ± epsilon", "at tensor model.layers.")


def test_weights_summing_to_zero_fail_in_validate(tmp_path, tiny_models):
    r = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1}},
                                             {"model": str(tiny_models["ft_b"]), "parameters": {"weight": -1}}]}
    fails_alike(tmp_path, r, "models[0].parameters.weight", "models[1].parameters.weight", "sum to 0")


def test_required_parameter_whose_filters_match_nothing(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"])
    r["models"][0]["parameters"]["weight"] = [{"filter": "self_attn", "value": 1.0}]
    fails_alike(tmp_path, r, "models[0].parameters.weight", "no filter entry matches", "model.embed_tokens.weight")


def test_layer_range_past_the_model_fails_in_validate(tmp_path, tiny_models):
    r = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(tiny_models["ft_a"]),
                                                                  "layer_range": [2, 6]}]}]}
    fails_alike(tmp_path, r, "slices[0].sources[0].layer_range", "4 layers")


@pytest.mark.parametrize("knob, value, needle", [
    ("noise_scale", float("inf"), "not a finite number"),
    ("noise_scale", float("nan"), "not a finite number"),
    ("noise_scale", 1e308, "less than or equal to 1000"),
    ("residual_scale", float("nan"), "not a finite number"),
    ("residual_scale", True, "not the boolean"),
])
def test_moe_knobs_must_be_finite(tmp_path, tiny_models, knob, value, needle):
    fails_alike(tmp_path, moe(tiny_models, {knob: value}), f"experts[0].{knob}", needle)


def test_recipe_that_is_a_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    result = {}

    def run() -> None:
        result["res"] = runner.invoke(app, ["build", str(fifo), str(tmp_path / "out"), "-q"])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader before failing
        with open(fifo, "w") as f:
            f.write("x")
        pytest.fail("reading a FIFO recipe blocked")
    res = result["res"]
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "out", "not a regular file")


def test_huge_recipe_is_refused(tmp_path, tiny_models):
    text = yaml.safe_dump(lin(tiny_models["ft_a"])) + "# " + "x" * (5 * 2**20) + "\n"
    fails_alike(tmp_path, text, "r.yaml", "too large for a recipe")


def test_long_prompt_lists_stay_out_of_the_card(tmp_path, tiny_models):
    prompts = [f"prompt number {k} " + "y" * 200 for k in range(400)]  # ~85 KB of prompts
    r = moe(tiny_models, {"positive_prompts": prompts}, {"positive_prompts": ["other"]}, gate_mode="cheap_embed")
    path = write(tmp_path, r)
    res = runner.invoke(app, ["build", str(path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert len(card) < len(path.read_text()) and "see `merger_config.yml`" in card


# --- checkpoints ----------------------------------------------------------------------------------

def corrupt_header(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    raw = edit(header)
    raw = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _overlap(h: dict) -> dict:
    """The last tensor in the file moved onto the first one's bytes."""
    name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    start, end = h[name]["data_offsets"]
    return {**h, name: {**h[name], "data_offsets": [0, end - start]}}


@pytest.mark.parametrize("case, edit, needle", [
    ("float offsets", lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets":
                                 [float(x) for x in h[_first_tensor(h)]["data_offsets"]]}}, "data_offsets"),
    ("no shape", lambda h: {**h, _first_tensor(h): {k: v for k, v in h[_first_tensor(h)].items() if k != "shape"}},
     "shape None"),
    ("overlap", _overlap, "overlaps"),
    ("nested", lambda h: b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_corrupt_safetensors_headers(tmp_path, tiny_models, case, edit, needle):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["ft_a"], bad)
    corrupt_header(bad, edit)
    fails_alike(tmp_path, lin(tiny_models["ft_b"], bad), "bad", needle)


def _sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "sharded"
    synth.write_checkpoint(folder, synth.llama_config(), synth.random_weights(synth.llama_config(), seed=3),
                           max_shard_bytes=100_000)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.parametrize("edit, needle", [
    (lambda idx: {**idx, "weight_map": list(idx["weight_map"])}, "no `weight_map`"),
    (lambda idx: {**idx, "weight_map": {**idx["weight_map"], "model.norm.weight": "../../other/x.safetensors"}},
     "not a file inside the model folder"),
    (lambda idx: {**idx, "weight_map": {**idx["weight_map"], "model.norm.weight": "/etc/passwd"}},
     "not a file inside the model folder"),
])
def test_bad_shard_index(tmp_path, tiny_models, edit, needle):
    folder = _sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps(edit(json.loads(index.read_text()))))
    fails_alike(tmp_path, lin(tiny_models["ft_b"], folder), "model.safetensors.index.json", needle)


def edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("value", ["four", None, -1, True])
def test_layer_count_of_the_wrong_type(tmp_path, tiny_models, value):
    bad = edit_config(tiny_models["ft_a"], tmp_path / "bad", num_hidden_layers=value)
    fails_alike(tmp_path, lin(tiny_models["ft_b"], bad), "bad", "num_hidden_layers")


def test_config_saying_fewer_layers_than_stored(tmp_path, tiny_models):
    bad = edit_config(tiny_models["ft_a"], tmp_path / "bad", num_hidden_layers=2)
    fails_alike(tmp_path, lin(bad), "says 2 layers", "layer 2", "num_hidden_layers")


def test_deeply_nested_config(tmp_path, tiny_models):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["ft_a"], bad)
    (bad / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    fails_alike(tmp_path, lin(bad), "config.json", "nested too deeply")


def test_moe_hidden_size_of_the_wrong_type(tmp_path, tiny_models):
    bad = edit_config(tiny_models["base"], tmp_path / "bad", hidden_size="abc")
    m = {**tiny_models, "base": bad}
    fails_alike(tmp_path, moe(m), "hidden_size", "'abc'")


def _with_nan(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    w[name] = w[name].clone()
    w[name][0, 0] = float("nan")
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nan_inside_an_expert_is_not_copied_through(tmp_path, tiny_models):
    bad = _with_nan(tiny_models["ft_a"], tmp_path / "bad", "model.layers.1.mlp.up_proj.weight")
    m = {**tiny_models, "ft_a": bad}
    fails_alike(tmp_path, moe(m), "bad", "model.layers.1.mlp.up_proj.weight", "NaN", validate_too=False)


def test_nan_inside_a_merge_input_names_the_model(tmp_path, tiny_models):
    bad = _with_nan(tiny_models["ft_a"], tmp_path / "bad", "model.layers.0.self_attn.q_proj.weight")
    err = fails_alike(tmp_path, lin(tiny_models["ft_b"], bad), "bad': tensor model.layers.0.self_attn.q_proj.weight",
                      "holds NaN", validate_too=False)
    assert "merge method" not in err


def test_overflowing_the_saved_dtype_names_out_dtype(tmp_path, tiny_models):
    r = lin(tiny_models["ft_a"], weight=1e6, out_dtype="float16")
    r["parameters"] = {"normalize": False}
    fails_alike(tmp_path, r, "beyond what torch.float16 holds", "out_dtype", validate_too=False)


def test_no_tensor_is_read_before_a_plan_error(tmp_path, tiny_models, monkeypatch):
    from merger.io.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "get", lambda self, name: pytest.fail(f"read {name}"))
    r = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1}},
                                             {"model": str(tiny_models["ft_b"]), "parameters": {"weight": -1}}]}
    fails_alike(tmp_path, r, "sum to 0")
