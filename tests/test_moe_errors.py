"""Bad MoE recipes and misbehaving gate plugins: one line naming the recipe field and what to do,
exit 1, no traceback, no output (or temp folder) left behind — and no tensor read before the
recipe and the models' headers are checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merger import GateInitializer, hookimpl, plugins, synth
from merger.cli import app
from merger.io.checkpoint import Checkpoint

from cli_checks import assert_one_line_error

runner = CliRunner()
CODE, STORY = ["def add(a, b):"], ["Once upon a time"]


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fails the test if any checkpoint tensor is read (validation must come first)."""
    reads: list[str] = []
    real = Checkpoint.get

    def get(self, name):
        reads.append(name)
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "get", get)
    yield reads
    assert reads == [], f"tensors were read before the error: {reads[:3]}"


def run_build(tmp_path: Path, recipe: dict, *extra: str) -> tuple[int, str, Path]:
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    res = runner.invoke(app, ["build", str(path), str(out), "-q", *extra])
    return res.exit_code, res.stderr, out


def recipe(m: dict[str, Path], **changes) -> dict:
    r = {"base_model": str(m["base"]), "gate_mode": "hidden", "experts_per_token": 2,
         "experts": [{"source_model": str(m["ft_a"]), "positive_prompts": CODE},
                     {"source_model": str(m["ft_b"]), "positive_prompts": STORY}]}
    r.update(changes)
    return r


def two_experts(m: dict[str, Path], a: dict, b: dict) -> list[dict]:
    return [{"source_model": str(m["ft_a"]), **a}, {"source_model": str(m["ft_b"]), **b}]


CASES = {
    "unknown_gate_mode": (lambda m: recipe(m, gate_mode="hiden"),
                          ["moe.yaml: gate_mode", "'hiden'", "cheap_embed, hidden, random, router_input, uniform_random"]),
    "experts_per_token_0": (lambda m: recipe(m, experts_per_token=0),
                            ["experts_per_token", "between 1 and the number of experts (2)"]),
    "experts_per_token_3": (lambda m: recipe(m, experts_per_token=3),
                            ["experts_per_token: 3", "between 1 and the number of experts (2)"]),
    "negative_without_positive": (lambda m: recipe(m, gate_mode="random",
                                                   experts=two_experts(m, {"negative_prompts": STORY}, {})),
                                  ["experts[0].negative_prompts", "without positive_prompts"]),
    "typo_top_level": (lambda m: {**recipe(m), "expert_per_token": 2}, ["expert_per_token", "unknown field"]),
    "typo_in_expert": (lambda m: recipe(m, experts=two_experts(m, {"positive_prompt": CODE}, {"positive_prompts": STORY})),
                       ["experts[0].positive_prompt", "unknown field"]),
    "no_experts": (lambda m: recipe(m, experts=[]), ["moe.yaml: experts: no experts; list at least one"]),
    "missing_base": (lambda m: {k: v for k, v in recipe(m).items() if k != "base_model"},
                     ["base_model", "required field is missing"]),
    "two_shared_experts": (lambda m: recipe(m, shared_experts=[{"source_model": str(m["base"]), "positive_prompts": STORY}] * 2),
                           ["shared_experts: 2 given", "keep one"]),
    "mixtral_with_shared": (lambda m: recipe(m, architecture="mixtral",
                                             shared_experts=[{"source_model": str(m["base"]), "positive_prompts": STORY}]),
                            ["shared_experts", "Mixtral has no shared expert"]),
    "qwen_without_shared": (lambda m: recipe(m, architecture="qwen"), ["architecture", "needs exactly one"]),
    "unknown_architecture": (lambda m: recipe(m, architecture="deepseek"), ["architecture: 'deepseek'", "mixtral"]),
    "tokenizer_union": (lambda m: recipe(m, tokenizer_source="union"), ["tokenizer_source", "vocabulary"]),
    "bad_dtype": (lambda m: recipe(m, dtype="float8"), ["dtype", "float8"]),
    "negative_noise": (lambda m: recipe(m, experts=two_experts(m, {"positive_prompts": CODE, "noise_scale": -1},
                                                               {"positive_prompts": STORY})),
                       ["experts[0].noise_scale"]),
    "gate_parameters_unknown": (lambda m: recipe(m, gate_parameters={"temperature": 2}),
                                ["gate_parameters.temperature", "gate_mode hidden takes: none"]),
    "missing_expert_folder": (lambda m: recipe(m, experts=[{"source_model": "./nowhere", "positive_prompts": CODE},
                                                           {"source_model": str(m["ft_b"]), "positive_prompts": STORY}]),
                              ["'./nowhere'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe(case, tmp_path, tiny_models, no_tensor_reads):
    make, needles = CASES[case]
    assert_one_line_error(*run_build(tmp_path, make(tiny_models)), *needles)


@pytest.mark.parametrize("gate", ["hidden", "cheap_embed", "router_input"])
def test_missing_or_identical_prompts_build_with_a_warning(gate, tmp_path, tiny_models):
    """Sparse upcycling and half-written recipes, as mergekit users publish them: an expert without prompts
    gets a zero router row, experts with the same prompts equal rows, each said once on stderr."""
    from safetensors.torch import load_file

    m = tiny_models
    r = recipe(m, gate_mode=gate, experts=[{"source_model": str(m["ft_a"]), "positive_prompts": CODE},
                                           {"source_model": str(m["ft_b"])},
                                           {"source_model": str(m["ft_c"]), "positive_prompts": CODE}])
    code, err, out = run_build(tmp_path, r)
    assert code == 0, err
    assert "experts[1]: no positive_prompts, so the router row is zero" in err
    assert "experts[0] and experts[2] have the same prompts" in err and "near-identical" not in err
    gates = load_file(str(out / "model.safetensors"))
    for i in range(4):
        g = gates[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        assert torch.count_nonzero(g[1]) == 0 and torch.equal(g[0], g[2]) and torch.count_nonzero(g[0]) > 0


def test_no_prompts_anywhere_gives_uniform_routing_with_a_warning(tmp_path, tiny_models):
    from safetensors.torch import load_file

    m = tiny_models
    code, err, out = run_build(tmp_path, recipe(m, experts=two_experts(m, {}, {})))
    assert code == 0 and "routing is uniform until the router is trained" in err, err
    g = load_file(str(out / "model.safetensors"))["model.layers.0.block_sparse_moe.gate.weight"]
    assert torch.count_nonzero(g) == 0


def test_validate_accepts_good_and_rejects_bad(tmp_path, tiny_models):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_models)))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "ok (moe (hidden))" in res.stdout, res.stderr
    path.write_text(yaml.safe_dump(recipe(tiny_models, experts_per_token=5)))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 1 and "experts_per_token: 5" in res.stderr


# --- model checks: config.json and safetensors headers only ------------------------------------
def make_odd_model(root: Path, kind: str) -> Path:
    path = root / kind
    if kind == "mistral":
        synth.make_llama(path, seed=3, model_type="mistral")
    elif kind == "wide":
        synth.make_llama(path, seed=3, intermediate=96)
    elif kind == "narrow":
        synth.make_llama(path, seed=3, hidden=32, heads=2, kv_heads=1)
    elif kind == "deeper":
        synth.make_llama(path, seed=3, layers=5)
    elif kind == "biased":
        synth.make_llama(path, seed=3, attention_bias=True)
    elif kind == "gpt2":
        synth.make_llama(path, seed=3)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("kind, role, needles", [
    ("mistral", "expert", ["experts[1].source_model", "'mistral' model", "base_model is 'llama'"]),
    ("wide", "expert", ["experts[1].source_model", "model.layers.0.mlp.gate_proj.weight is [96, 64]",
                        "[128, 64] in experts[0]"]),
    ("narrow", "expert", ["experts[1].source_model", "hidden_size 32", "base_model has 64"]),
    ("deeper", "expert", ["experts[1].source_model", "num_hidden_layers 5", "base_model has 4"]),
    ("biased", "base", ["base_model", "attention_bias: true", "MixtralForCausalLM"]),
    ("gpt2", "base", ["base_model", "'gpt2' model", "Llama, Mistral, Qwen2 or Qwen3"]),
])
def test_models_that_do_not_fit(kind, role, needles, tmp_path, tiny_models, no_tensor_reads):
    odd = make_odd_model(tmp_path / "models", kind)
    r = recipe(tiny_models)
    if role == "base":
        r["base_model"] = str(odd)
    else:
        r["experts"][1]["source_model"] = str(odd)
    assert_one_line_error(*run_build(tmp_path, r), *needles)


# --- gate plugins ------------------------------------------------------------------------------
class Registers:
    def __init__(self, *gates: type):
        self.gates = gates

    @hookimpl
    def merger_register_gate_initializers(self, register) -> None:
        for cls in self.gates:
            register(cls)


class BadShape(GateInitializer):
    name = "bad_shape"

    def init_gates(self, ctx):
        return torch.zeros(2, 2)


class Crashes(GateInitializer):
    name = "crashes"

    def init_gates(self, ctx):
        return {}["missing"]


@pytest.mark.parametrize("cls, needles", [
    (BadShape, ["gate initializer 'bad_shape' (plugin 'test-gates')", "returned [2, 2]", "[4, 2, 64]"]),
    (Crashes, ["gate initializer 'crashes' (plugin 'test-gates') failed: KeyError"]),
])
def test_misbehaving_gate_plugin(cls, needles, tmp_path, tiny_models):
    with plugins.registered(Registers(cls), "test-gates"):
        assert_one_line_error(*run_build(tmp_path, recipe(tiny_models, gate_mode=cls.name)), *needles)


def test_prompt_longer_than_the_context(tmp_path, tiny_models):
    long = "x = 1\n" * 400  # ~800 tokens; the tiny models hold 512 positions
    r = recipe(tiny_models, experts=two_experts(tiny_models, {"positive_prompts": CODE}, {"positive_prompts": [long]}))
    assert_one_line_error(*run_build(tmp_path, r), "prompt 'x = 1\\nx = 1", "max_position_embeddings")


def test_failure_while_writing_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    """Disk full halfway through the shards: the staged folder is removed, OUT_DIR never appears."""
    from merger.io.writer import ShardWriter

    real, count = ShardWriter.write, []

    def write(self, name, tensor):
        count.append(name)
        if len(count) == 20:
            raise OSError(28, "No space left on device", str(tmp_path / "out"))
        return real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", write)
    assert_one_line_error(*run_build(tmp_path, recipe(tiny_models, gate_mode="random"), "--out-shard-size", "100KB"),
                          "No space left on device")
    assert len(count) == 20
