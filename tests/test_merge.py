"""End-to-end merges on tiny seeded Llamas: every output tensor against the formula recomputed here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from merger.pipeline import build_recipe
from merger.recipe_file import load_recipe


def build(tmp_path: Path, recipe: dict, name: str = "out", **kw) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return build_recipe(load_recipe(path), tmp_path / name, progress=False, **kw)


def test_linear_of_one_model_is_that_model(tmp_path, tiny_models, load_weights):
    out = build(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tiny_models["ft_a"]), "parameters": {"weight": 0.7}}]})
    got, want = load_weights(out), load_weights(tiny_models["ft_a"])
    assert list(got) == sorted(want, key=list(got).index) and set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_weights(tmp_path, tiny_models, load_weights, normalize):
    w = {"ft_a": 0.5, "ft_b": 0.3, "base": 0.6}
    out = build(tmp_path, {"merge_method": "linear", "parameters": {"normalize": normalize},
                           "models": [{"model": str(tiny_models[k]), "parameters": {"weight": v}} for k, v in w.items()]})
    got = load_weights(out)
    src = {k: load_weights(tiny_models[k]) for k in w}
    for name in got:
        want = sum(v * src[k][name] for k, v in w.items())
        if normalize:
            want = want / sum(w.values())
        assert_close(got[name], want)


def test_linear_base_joins_as_input(tmp_path, tiny_models, load_weights):
    out = build(tmp_path, {"merge_method": "linear", "base_model": str(tiny_models["base"]),
                           "parameters": {"weight": 1.0},
                           "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 3.0}}]})
    got, a, b = load_weights(out), load_weights(tiny_models["ft_a"]), load_weights(tiny_models["base"])
    for name in got:
        assert_close(got[name], (3 * a[name] + b[name]) / 4)


def test_task_arithmetic_gradient_and_filters(tmp_path, tiny_models, load_weights):
    """Per-model filter list with a gradient; top-level lambda; tensors outside layers take the first value."""
    grad = [0.0, 1.0, 0.5]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]),
              "parameters": {"lambda": 0.9, "weight": 0.25},
              "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": [
                  {"filter": "self_attn", "value": grad}, {"filter": "mlp", "value": 0.8}]}},
                  {"model": str(tiny_models["ft_b"])}]}
    out = build(tmp_path, recipe)
    got = load_weights(out)
    base, a, b = (load_weights(tiny_models[k]) for k in ("base", "ft_a", "ft_b"))
    n = 4

    def interp(t: float) -> float:  # piecewise linear over [0, 0.5, 1]
        return 2 * t * grad[1] + (1 - 2 * t) * grad[0] if t <= 0.5 else grad[1] + (t - 0.5) * 2 * (grad[2] - grad[1])

    for name in got:
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if "self_attn" in name:
            wa = interp(layer / (n - 1))
        elif "mlp" in name:
            wa = 0.8
        else:
            wa = 0.25  # no filter matches: falls through to the top-level weight
        want = base[name] + 0.9 * (wa * (a[name] - base[name]) + 0.25 * (b[name] - base[name]))
        assert_close(got[name], want, msg=name)


def test_frankenmerge_layers_and_order(tmp_path, tiny_models, load_weights):
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny_models["ft_a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(tiny_models["ft_b"]), "layer_range": [1, 4]}]},
        {"sources": [{"model": str(tiny_models["ft_c"]), "layer_range": [3, 4],
                      "parameters": {"scale": 0.5}}]}]}
    out = build(tmp_path, recipe)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7
    got = load_weights(out)
    a, b, c = (load_weights(tiny_models[k]) for k in ("ft_a", "ft_b", "ft_c"))
    origin = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (c, 3)]
    for i, (src, j) in enumerate(origin):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            want = src[f"model.layers.{j}.{suffix}"] * (0.5 if i == 6 else 1.0)
            assert_close(got[f"model.layers.{i}.{suffix}"], want)
    assert_close(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice's model
    assert_close(got["lm_head.weight"], c["lm_head.weight"] * 0.5)                  # last slice's model
    assert_close(got["model.norm.weight"], c["model.norm.weight"] * 0.5)
    # Tensor order on disk: embeddings, layers in numeric order, then final norm / lm_head.
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["merger_method"] == "passthrough"
    index_order = [n for n in got]
    layers = [int(n.split(".")[2]) for n in index_order if ".layers." in n]
    assert len(layers) == 7 * 9


def test_slices_with_two_sources_use_gradient_per_slice(tmp_path, tiny_models, load_weights):
    """mergekit's classic slerp-style layout with linear: t restarts in each slice."""
    recipe = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(tiny_models["ft_a"]), "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                     {"model": str(tiny_models["ft_b"]), "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}}]},
        {"sources": [{"model": str(tiny_models["ft_a"]), "layer_range": [2, 4], "parameters": {"weight": [1.0, 0.0]}},
                     {"model": str(tiny_models["ft_b"]), "layer_range": [2, 4], "parameters": {"weight": [0.0, 1.0]}}]}]}
    got = load_weights(build(tmp_path, recipe))
    a, b = load_weights(tiny_models["ft_a"]), load_weights(tiny_models["ft_b"])
    key = "model.layers.{}.mlp.up_proj.weight"
    assert_close(got[key.format(0)], a[key.format(0)])
    assert_close(got[key.format(1)], b[key.format(1)])
    assert_close(got[key.format(2)], a[key.format(2)])
    assert_close(got[key.format(3)], b[key.format(3)])
    assert_close(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first value of the gradient


def test_merged_model_loads_in_transformers(tmp_path, tiny_models, load_weights):
    transformers = pytest.importorskip("transformers")
    out = build(tmp_path, {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1}},
        {"model": str(tiny_models["ft_b"]), "parameters": {"weight": 1}}]})
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    direct = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["ft_a"]).eval()
    direct.load_state_dict(load_weights(out))
    ids = torch.tensor([[1, 5, 77, 300, 12, 9]])
    with torch.no_grad():
        got, want = merged(ids).logits, direct(ids).logits
    assert torch.isfinite(got).all()
    assert_close(got, want, rtol=0, atol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Once upon a time").input_ids[0] == 1


def test_dtype_and_out_dtype(tmp_path, tiny_models, load_weights):
    out = build(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]),
                           "dtype": "float32", "out_dtype": "bfloat16",
                           "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 0.5}}]})
    got = load_weights(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    base, a = load_weights(tiny_models["base"]), load_weights(tiny_models["ft_a"])
    name = "model.layers.1.self_attn.k_proj.weight"
    assert_close(got[name], (base[name] + 0.5 * (a[name] - base[name])).to(torch.bfloat16))


def test_sharded_output_round_trips(tmp_path, tiny_models, load_weights):
    out = build(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1.0}}]}, shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    got, want = load_weights(out), load_weights(tiny_models["ft_a"])
    assert set(got) == set(index["weight_map"]) == set(want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for k in want:
        assert_close(got[k], want[k], rtol=0, atol=0)
    # A sharded checkpoint is a valid input too: merging it again gives the same tensors.
    again = build(tmp_path, {"merge_method": "linear", "models": [{"model": str(out), "parameters": {"weight": 2.0}}]},
                  name="again")
    for k, t in load_weights(again).items():
        assert_close(t, want[k], rtol=0, atol=0)


def test_tied_embeddings(tmp_path, load_weights):
    from merger import synth
    base = synth.make_llama(tmp_path / "tb", seed=3, tie=True)
    synth.make_llama(tmp_path / "tf", seed=4, base=base, tie=True)
    untied = synth.make_llama(tmp_path / "ut", seed=5)  # same shapes, its own lm_head
    out = build(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "tb"), "parameters": {"weight": 1}},
        {"model": str(tmp_path / "tf"), "parameters": {"weight": 1}}]})
    got = load_weights(out)
    assert "lm_head.weight" not in got
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    # An untied input merged into a tied reference: its lm_head is not needed, embeddings merge.
    out2 = build(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "ut"), "parameters": {"weight": 1}},
        {"model": str(tmp_path / "tb"), "parameters": {"weight": 1}}]}, name="mixed")
    got2 = load_weights(out2)
    assert_close(got2["lm_head.weight"], (untied["lm_head.weight"] + base["model.embed_tokens.weight"]) / 2)


def test_tokenizer_and_recipe_copied(tmp_path, tiny_models):
    out = build(tmp_path, {"merge_method": "linear", "tokenizer_source": str(tiny_models["ft_b"]), "models": [
        {"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1}}]})
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "merger_config.yml", "config.json"):
        assert (out / f).is_file(), f
    assert (out / "tokenizer.json").read_bytes() == (tiny_models["ft_b"] / "tokenizer.json").read_bytes()
    assert yaml.safe_load((out / "merger_config.yml").read_text())["merge_method"] == "linear"
    assert not [p for p in tmp_path.iterdir() if "merger-tmp" in p.name]


def test_slices_rewrite_the_per_layer_config_keys(tmp_path):
    """A frankenmerge of Qwen2-style configs: layer_types are taken from each slice's source layers,
    mlp_only_layers renumbered, and a max_window_layers rule turned into explicit layer_types."""
    import json

    from merger import synth
    from merger.layer_config import layer_updates

    a = synth.make_llama(tmp_path / "a", seed=1)
    synth.make_llama(tmp_path / "b", seed=2, base=a)
    for name, types in (("a", ["sliding_attention", "full_attention"] * 2), ("b", ["full_attention"] * 4)):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg["layer_types"] = types
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(tmp_path / "b"), "layer_range": [2, 4]}]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = build_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention",
                                  "full_attention", "full_attention"]
    # the index rules, recomputed: Qwen2 (first max_window_layers full) and Gemma 3 (every 2nd full)
    qwen = {"num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 2, "mlp_only_layers": [1, 3]}
    got = layer_updates(qwen, [(qwen, 1, 4), (qwen, 0, 2)])
    assert got["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention",
                                  "full_attention", "full_attention"]
    assert got["mlp_only_layers"] == [0, 2, 4] and got["max_window_layers"] == 5
    gemma = {"num_hidden_layers": 4, "sliding_window_pattern": 2}
    assert layer_updates(gemma, [(gemma, 1, 3)])["layer_types"] == ["full_attention", "sliding_attention"]
