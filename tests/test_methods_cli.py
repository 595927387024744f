"""The new methods end to end through `merger build` on tiny seeded Llamas: saved tensors against
formulas recomputed here, seeded reruns byte-identical, and invalid parameters rejected at recipe
load with the YAML path (one line, exit 1, no output folder)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from cli_checks import assert_one_line_error
from torch.testing import assert_close
from typer.testing import CliRunner

from merger.cli import app

runner = CliRunner()
NAME = "model.layers.{}.self_attn.q_proj.weight"


def cli_build(tmp_path: Path, recipe: dict, out: str = "out", *extra: str):
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["build", str(path), str(tmp_path / out), "-q", *extra])
    return res, tmp_path / out


def model(path: Path, **params) -> dict:
    return {"model": str(path), "parameters": params} if params else {"model": str(path)}


def test_ties_build_matches_formula(tmp_path, tiny_models, load_weights):
    recipe = {"merge_method": "ties", "base_model": str(tiny_models["base"]), "parameters": {"lambda": 0.9},
              "models": [model(tiny_models["ft_a"], weight=1.0, density=0.4),
                         model(tiny_models["ft_b"], weight=0.5, density=0.6)]}
    res, out = cli_build(tmp_path, recipe)
    assert res.exit_code == 0, res.stderr
    got = load_weights(out)
    base, a, b = (load_weights(tiny_models[k]) for k in ("base", "ft_a", "ft_b"))
    for name in (NAME.format(2), "model.embed_tokens.weight", "model.norm.weight"):
        terms = []
        for src, w, dens in ((a, 1.0, 0.4), (b, 0.5, 0.6)):
            d = (src[name] - base[name]).reshape(-1)
            k = max(1, int(dens * d.numel()))
            keep = torch.zeros_like(d)
            keep[torch.sort(d.abs(), descending=True, stable=True).indices[:k]] = 1
            terms.append((w, (d * keep).reshape(base[name].shape)))
        total = sum(w * d for w, d in terms)
        sign = torch.where(total >= 0, 1.0, -1.0)
        num = sum(w * d * (torch.sign(w * d) == sign) for w, d in terms)
        den = sum(w * (torch.sign(w * d) == sign).float() for w, d in terms)
        want = base[name] + 0.9 * num / torch.where(den == 0, 1.0, den)
        assert_close(got[name], want, msg=name)


def test_slerp_build_with_filter_gradients(tmp_path, tiny_models, load_weights):
    recipe = {"merge_method": "slerp", "base_model": str(tiny_models["ft_a"]),
              "slices": [{"sources": [{"model": str(tiny_models["ft_a"]), "layer_range": [0, 4]},
                                      {"model": str(tiny_models["ft_b"]), "layer_range": [0, 4]}]}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]}}
    res, out = cli_build(tmp_path, recipe)
    assert res.exit_code == 0, res.stderr
    got, a, b = load_weights(out), load_weights(tiny_models["ft_a"]), load_weights(tiny_models["ft_b"])
    for layer in range(4):
        name = NAME.format(layer)
        t = layer / 3
        v0, v1 = a[name].double(), b[name].double()
        cos = float((v0 * v1).sum() / (v0.norm() * v1.norm()))
        theta = math.acos(cos)
        want = (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
        assert_close(got[name].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[NAME.format(0)], a[NAME.format(0)])   # t = 0 is exactly the base
    assert torch.equal(got[NAME.format(3)], b[NAME.format(3)])   # t = 1 exactly the other


def test_model_stock_build(tmp_path, tiny_models, load_weights):
    recipe = {"merge_method": "model_stock", "base_model": str(tiny_models["base"]),
              "models": [model(tiny_models[k]) for k in ("ft_a", "ft_b", "ft_c")]}
    res, out = cli_build(tmp_path, recipe)
    assert res.exit_code == 0, res.stderr
    got = load_weights(out)
    base, *fts = (load_weights(tiny_models[k]) for k in ("base", "ft_a", "ft_b", "ft_c"))
    name = "model.layers.1.mlp.down_proj.weight"
    offs = [(f[name] - base[name]).double().reshape(-1) for f in fts]
    cos = sum(float(offs[i] @ offs[j] / (offs[i].norm() * offs[j].norm())) for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    t = 3 * cos / (1 + 2 * cos)
    want = t * sum(f[name] for f in fts) / 3 + (1 - t) * base[name]
    assert_close(got[name], want)


def test_random_seed_reproducible_bytes(tmp_path, tiny_models):
    recipe = {"merge_method": "dare_ties", "base_model": str(tiny_models["base"]),
              "models": [model(tiny_models["ft_a"], weight=0.5, density=0.3),
                         model(tiny_models["ft_b"], weight=0.5, density=0.3)]}
    outs = {}
    for tag, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        res, out = cli_build(tmp_path, recipe, f"out-{tag}", "--random-seed", seed)
        assert res.exit_code == 0, res.stderr
        outs[tag] = (out / "model.safetensors").read_bytes()
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]


def assert_rejected(res, out: Path, *needles: str) -> None:
    assert_one_line_error(res.exit_code, res.stderr, out, *needles)


def _bad(tiny, case: str) -> dict:
    base, a, b, c = (str(tiny[k]) for k in ("base", "ft_a", "ft_b", "ft_c"))
    w = {"weight": 1.0}
    return {
        "density_above_one": {"merge_method": "ties", "base_model": base,
                              "models": [{"model": a, "parameters": {"weight": 1.0, "density": 1.5}}]},
        "density_negative_top_level": {"merge_method": "dare_ties", "base_model": base, "parameters": {"density": -0.1},
                                       "models": [{"model": a, "parameters": w}]},
        "slerp_three": {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
                        "models": [{"model": a}, {"model": b}, {"model": base}]},
        "model_stock_two": {"merge_method": "model_stock", "base_model": base, "models": [{"model": a}]},
        "ties_no_base": {"merge_method": "ties",
                         "models": [{"model": a, "parameters": w}, {"model": b, "parameters": w}]},
        "della_epsilon": {"merge_method": "della", "base_model": base,
                          "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.2}}]},
        "nearswap_t_zero": {"merge_method": "nearswap", "base_model": base, "parameters": {"t": 0},
                            "models": [{"model": a}]},
        "gama_on_ties": {"merge_method": "ties", "base_model": base,
                         "models": [{"model": a, "parameters": {"weight": 1.0, "gama": 0.1}}]},
    }[case]


@pytest.mark.parametrize("case,needles", [
    ("density_above_one", ("models[0].parameters.density", "less than or equal to 1")),
    ("density_negative_top_level", ("parameters.density", "greater than or equal to 0")),
    ("slerp_three", ("merge_method", "slerp merges exactly 2 models", "got 3")),
    ("model_stock_two", ("merge_method", "model_stock merges at least 3 models", "got 2")),
    ("ties_no_base", ("ties needs a base_model",)),
    ("della_epsilon", ("models[0].parameters", "density ± epsilon")),
    ("nearswap_t_zero", ("parameters.t", "greater than 0")),
    ("gama_on_ties", ("models[0].parameters.gama", "did you mean", "density, weight")),
])
def test_invalid_parameters_fail_at_load(tmp_path, tiny_models, case, needles):
    res, out = cli_build(tmp_path, _bad(tiny_models, case))
    assert_rejected(res, out, "out.yaml", *needles)


def test_a_parameter_another_method_uses_is_ignored_aloud(tmp_path, tiny_models, load_weights):
    """mergekit ignores a parameter a method does not use (gamma on ties, weight on sce); merger too, with a
    warning naming it, and the merge is exactly the one without it."""
    base, a, b = (str(tiny_models[k]) for k in ("base", "ft_a", "ft_b"))
    with_gamma = {"merge_method": "ties", "base_model": base,
                  "models": [{"model": a, "parameters": {"weight": 1.0, "gamma": 0.1, "density": 0.5}}]}
    res, out = cli_build(tmp_path, with_gamma)
    assert res.exit_code == 0 and "models[0].parameters.gamma: ties does not use 'gamma'" in res.stderr, res.stderr
    plain = {**with_gamma, "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}}]}
    (tmp_path / "plain").mkdir()
    res2, out2 = cli_build(tmp_path / "plain", plain)
    assert res2.exit_code == 0 and "warning" not in res2.stderr
    got, want = load_weights(out), load_weights(out2)
    assert all(torch.equal(got[k], want[k]) for k in want)
    sce = {"merge_method": "sce", "base_model": base, "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                                {"model": b, "parameters": {"weight": 0.5}}]}
    (tmp_path / "sce").mkdir()
    res3, _ = cli_build(tmp_path / "sce", sce)
    assert res3.exit_code == 0 and "sce does not use 'weight'" in res3.stderr


def test_base_model_of_a_method_without_one_only_donates_the_config(tmp_path, tiny_models, load_weights):
    """mergekit ignores base_model for karcher/passthrough except as the config and tokenizer donor."""
    base, a, c = (str(tiny_models[k]) for k in ("base", "ft_a", "ft_c"))
    r = {"merge_method": "karcher", "base_model": base, "models": [{"model": a}, {"model": c}]}
    res, out = cli_build(tmp_path, r)
    assert res.exit_code == 0 and "karcher merges no base model" in res.stderr, res.stderr
    (tmp_path / "plain").mkdir()
    res2, out2 = cli_build(tmp_path / "plain", {k: v for k, v in r.items() if k != "base_model"})
    got, want = load_weights(out), load_weights(out2)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_misplaced_and_misspelt_keys_say_where_they_belong(tmp_path, tiny_models):
    base, a = str(tiny_models["base"]), str(tiny_models["ft_a"])
    r = {"merge_method": "sce", "base_model": base, "select_topk": 0.5, "models": [{"model": a}, {"model": base}]}
    res, out = cli_build(tmp_path, r)
    assert_rejected(res, out, "select_topk", "method parameter", "top-level `parameters:`")
    r = {"merge_method": "linear", "models": [{"model": a, "weight": 1.0}]}
    res, out = cli_build(tmp_path, r)
    assert_rejected(res, out, "models[0].weight", "`models[0].parameters:`")
    r = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}}], "tokenizer_sorce": "base"}
    res, out = cli_build(tmp_path, r)
    assert_rejected(res, out, "tokenizer_sorce", "did you mean 'tokenizer_source'")
    r = {"merge_method": "ties", "base_model": base, "models": [{"model": a, "parameters": {"weight": 1.0, "lambda": 2}}]}
    res, out = cli_build(tmp_path, r)
    assert_rejected(res, out, "models[0].parameters.lambda", "not per model", "top-level")


def test_shard_bytes_do_not_depend_on_metadata_order(tmp_path):
    # safetensors writes __metadata__ in hash-map order; the writer sorts it so reruns match byte for byte.
    from merger.io.writer import write_tensors

    blobs = set()
    for k in range(12):
        out = tmp_path / f"w{k}"
        out.mkdir()
        write_tensors(out, {"x": torch.arange(6.0)}, metadata={"merger_method": "ties", "zeta": "1", "alpha": "2"})
        blobs.add((out / "model.safetensors").read_bytes())
    assert len(blobs) == 1
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w0" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "merger_method": "ties", "zeta": "1", "alpha": "2"}
        assert torch.equal(f.get_tensor("x"), torch.arange(6.0))
