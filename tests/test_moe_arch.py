"""Clown-car MoEs of the Qwen families, on tiny seeded checkpoints made with transformers' own classes
(tests/arch_models.py): Qwen2/2.5 experts -> Qwen2-MoE keeping the base's real q/k/v biases and a shared
expert, Qwen3 experts -> Qwen3-MoE (chosen by the inputs, no shared expert, q/k norms kept). transformers
loads every output with no missing or unexpected key; identical experts give the dense model's logits;
mixes no layout can hold fail before any tensor is read, in one line naming the recipe key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from arch_models import build as build_model
from cli_checks import assert_one_line_error
from typer.testing import CliRunner

from merger.cli import app
from merger.io.checkpoint import Checkpoint
from merger.moe.recipe import named_layouts
from merger.pipeline import build_recipe
from merger.recipe_file import load_recipe

transformers = pytest.importorskip("transformers")

CODE, STORY, MATH = ["def add(a, b):"], ["Once upon a time"], ["The derivative of x squared"]
L = 3  # arch_models: 3 layers


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    """A base and two differently seeded 'fine-tunes' of Qwen2 and Qwen3, plus the odd ones out."""
    root = tmp_path_factory.mktemp("qwen")
    out = {f"{fam}_{k}": build_model(fam, root / f"{fam}_{k}", seed=s)
           for fam in ("qwen2", "qwen3") for k, s in (("base", 10), ("a", 11), ("b", 12))}
    out["gemma2"] = build_model("gemma2", root / "gemma2", seed=13, hidden_size=64)
    out["phi3"] = build_model("phi3_partial", root / "phi3", seed=14)
    out["qwen3_narrow"] = build_model("qwen3", root / "qwen3_narrow", seed=15, hidden_size=32, head_dim=8)
    out["qwen2_sliding"] = build_model("qwen2_sliding", root / "qwen2_sliding", seed=16)
    return out


def build(tmp_path: Path, recipe: dict, name: str = "out") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return build_recipe(load_recipe(path), tmp_path / name, progress=False)


def expert(path: Path, prompts: list[str] | None = None, **extra) -> dict:
    return {"source_model": str(path), **({"positive_prompts": prompts} if prompts else {}), **extra}


def hf_model(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


def engine_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from merger.engine.model import load_model

    return load_model(path, dtype=torch.float32)(ids)[0]


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Largest deviation at most `tol` of the reference's largest logit (float32 summation order aside)."""
    assert float((got - want).abs().max() / want.abs().max()) <= tol


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    try:
        return {n: ck.get(n) for n in ck.names}
    finally:
        ck.close()


IDS = torch.randint(3, 512, (1, 18), generator=torch.Generator().manual_seed(3))


# --- Qwen2 -> Qwen2-MoE -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2_base", "qwen2_sliding"])
def test_qwen2_moe_of_identical_experts_is_the_dense_qwen2_with_its_real_biases(tmp_path, qwen, name):
    """Routed experts all the base MLP, the shared expert silenced (residual_scale 0): the output must compute
    exactly the dense Qwen2, which it can only do with the base's own (non-zero) q/k/v biases and, for a
    Qwen2.5-style base, its sliding window on the layers Qwen2's rule gives it (tied embeddings too)."""
    base = qwen[name]
    out = build(tmp_path, {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
                           "experts": [expert(base), expert(base), expert(base)],
                           "shared_experts": [expert(qwen["qwen2_a"], residual_scale=0.0)]})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["qkv_bias"] is True
    got, src = tensors(out), tensors(base)
    for i in range(L):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.bias"
            assert torch.equal(got[name], src[name]) and src[name].abs().max() > 0.01
    if name == "qwen2_sliding":
        assert cfg["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
        assert cfg["sliding_window"] == 6 and cfg["tie_word_embeddings"] is True and "lm_head.weight" not in got
    dense = logits(hf_model(base), IDS)
    moe = hf_model(out)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert_rel(logits(moe, IDS), dense, 1e-6)
    assert_rel(engine_logits(out, IDS), dense, 1e-6)


def test_qwen2_experts_with_a_shared_expert_load_in_transformers_and_match_the_engine(tmp_path, qwen):
    out = build(tmp_path, {"base_model": str(qwen["qwen2_base"]), "gate_mode": "hidden", "architecture": "qwen",
                           "experts": [expert(qwen["qwen2_a"], CODE), expert(qwen["qwen2_b"], STORY)],
                           "shared_experts": [expert(qwen["qwen2_base"], MATH)]})
    got, shared, a = tensors(out), tensors(qwen["qwen2_base"]), tensors(qwen["qwen2_a"])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(got[f"model.layers.1.mlp.shared_expert.{proj}.weight"],
                           shared[f"model.layers.1.mlp.{proj}.weight"])
        assert torch.equal(got[f"model.layers.1.mlp.experts.0.{proj}.weight"], a[f"model.layers.1.mlp.{proj}.weight"])
    assert_rel(engine_logits(out, IDS), logits(hf_model(out), IDS), 1e-5)
    assert "Qwen2MoeForCausalLM" in (out / "README.md").read_text()


# --- Qwen3 -> Qwen3-MoE -------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", [None, "qwen", "Qwen3", "qwen3_moe"])
def test_qwen3_experts_become_qwen3_moe_and_identical_ones_give_the_dense_logits(tmp_path, qwen, architecture):
    """Chosen for Qwen3 inputs with or without `architecture` (mergekit: 'qwen' names both Qwen layouts, the
    inputs pick Qwen3 MoE); no shared expert; q/k norms and head_dim kept, so identical experts are the dense model."""
    base = qwen["qwen3_base"]
    recipe = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
              "experts": [expert(base), expert(base), expert(base), expert(base)]}
    if architecture:
        recipe["architecture"] = architecture
    out = build(tmp_path, recipe)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"], cfg["num_experts"]) == (["Qwen3MoeForCausalLM"], "qwen3_moe", 4)
    assert cfg["norm_topk_prob"] is True and cfg["head_dim"] == 24 and cfg["moe_intermediate_size"] == 96
    assert not any(k.startswith("shared_expert") for k in cfg)
    got, src = tensors(out), tensors(base)
    assert not any("shared_expert" in n or n.endswith("_proj.bias") for n in got)
    for norm in ("q_norm", "k_norm"):
        name = f"model.layers.2.self_attn.{norm}.weight"
        assert torch.equal(got[name], src[name])
    dense = logits(hf_model(base), IDS)
    moe = hf_model(out)
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    assert_rel(logits(moe, IDS), dense, 1e-6)
    assert_rel(engine_logits(out, IDS), dense, 1e-6)
    assert "Qwen3MoeForCausalLM" in (out / "README.md").read_text()


@pytest.mark.parametrize("gate_mode", ["hidden", "router_input"])
def test_qwen3_moe_of_distinct_experts_matches_transformers(tmp_path, qwen, gate_mode):
    out = build(tmp_path, {"base_model": str(qwen["qwen3_base"]), "gate_mode": gate_mode, "experts_per_token": 1,
                           "experts": [expert(qwen["qwen3_a"], CODE), expert(qwen["qwen3_b"], STORY)]})
    got, b = tensors(out), tensors(qwen["qwen3_b"])
    assert torch.equal(got["model.layers.0.mlp.experts.1.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"])
    assert got["model.layers.0.mlp.gate.weight"].shape == (2, 64)
    assert_rel(engine_logits(out, IDS), logits(hf_model(out), IDS), 1e-5)


# --- mixes no layout holds: one line, before any tensor is read ----------------------------------
@pytest.fixture
def no_tensor_reads(monkeypatch):
    reads: list[str] = []
    real = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: reads.append(name) or real(self, name))
    yield reads
    assert reads == [], f"tensors were read before the error: {reads[:3]}"


def _cli_build(tmp_path: Path, recipe: dict) -> tuple[int, str, Path]:
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = CliRunner().invoke(app, ["build", str(path), str(tmp_path / "out"), "-q"])
    return res.exit_code, res.stderr, tmp_path / "out"


def _recipe(q: dict[str, Path], base: str, experts: list[str], shared: str | None = None, **extra) -> dict:
    r = {"base_model": str(q[base]), "gate_mode": "random", "experts_per_token": 1,
         "experts": [expert(q[e]) for e in experts], **extra}
    if shared:
        r["shared_experts"] = [expert(q[shared])]
    return r


@pytest.mark.parametrize("make, needles", [
    (lambda q: _recipe(q, "qwen2_base", ["qwen2_a", "gemma2"], shared="qwen2_base"),
     ["experts[1].source_model", "'gemma2' model but base_model is 'qwen2'"]),
    (lambda q: _recipe(q, "qwen3_base", ["qwen3_a", "qwen3_narrow"]),
     ["experts[1].source_model", "hidden_size 32 but base_model has 64"]),
    (lambda q: _recipe(q, "gemma2", ["gemma2", "gemma2"]),
     ["base_model", "'gemma2' model: transformers has no MoE class with Gemma 2's layers",
      "Llama, Mistral, Qwen2 or Qwen3"]),
    (lambda q: _recipe(q, "phi3", ["phi3", "phi3"]), ["base_model", "'phi3' model", "Phi-3"]),
    (lambda q: _recipe(q, "qwen2_base", ["qwen2_a", "qwen2_b"]),
     ["base_model: qwen2 models compose into Qwen2-MoE here, which needs exactly one entry in shared_experts"]),
    (lambda q: _recipe(q, "qwen3_base", ["qwen3_a", "qwen3_b"], shared="qwen3_base"),
     ["shared_experts: qwen3 models compose into Qwen3 MoE here, which has no shared expert"]),
    (lambda q: _recipe(q, "qwen3_base", ["qwen3_a", "qwen3_b"], architecture="mixtral"),
     ["architecture: 'mixtral' (Mixtral) composes llama, mistral models, but base_model is a qwen3 model",
      "use architecture: qwen3"]),
    (lambda q: _recipe(q, "qwen2_base", ["qwen2_a", "qwen3_a"], shared="qwen2_base"),
     ["experts[1].source_model", "'qwen3' model but base_model is 'qwen2'"]),
], ids=["gemma-expert-in-qwen2", "narrow-expert", "gemma-base", "phi3-base", "qwen2-no-shared",
        "qwen3-with-shared", "qwen3-as-mixtral", "qwen3-expert-in-qwen2"])
def test_mixes_no_layout_can_hold(tmp_path, qwen, no_tensor_reads, make, needles):
    assert_one_line_error(*_cli_build(tmp_path, make(qwen)), *needles)


def test_llama_models_named_qwen3_are_refused_before_reading(tmp_path, tiny_models, no_tensor_reads):
    r = {"base_model": str(tiny_models["base"]), "gate_mode": "random", "architecture": "qwen3",
         "experts": [expert(tiny_models["ft_a"]), expert(tiny_models["ft_b"])]}
    assert_one_line_error(*_cli_build(tmp_path, r), "architecture: 'qwen3' (Qwen3 MoE) composes qwen3 models",
                          "base_model is a llama model", "mixtral or qwen")


@pytest.mark.parametrize("name, want", [
    (None, ["mixtral", "qwen2_moe", "qwen3_moe"]), ("", ["mixtral", "qwen2_moe", "qwen3_moe"]),
    ("q", ["qwen2_moe", "qwen3_moe"]), ("Qwen", ["qwen2_moe", "qwen3_moe"]), ("qwen moe", ["qwen2_moe"]),
    ("QWEN3", ["qwen3_moe"]), ("qwen3 moe", ["qwen3_moe"]), ("Mix", ["mixtral"]), ("qwen2_moe", ["qwen2_moe"]),
    ("deepseek", []), ("llama", []),
])
def test_architecture_names_layouts_by_prefix_as_mergekit_does(name, want):
    assert named_layouts(name) == want


def test_qwen2_models_named_mixtral_are_pointed_to_qwen(tmp_path, qwen, no_tensor_reads):
    r = _recipe(qwen, "qwen2_base", ["qwen2_a", "qwen2_b"], shared=None, architecture="mixtral")
    assert_one_line_error(*_cli_build(tmp_path, r), "architecture: 'mixtral' (Mixtral) composes llama, mistral",
                          "base_model is a qwen2 model; use architecture: qwen, or leave it out")
