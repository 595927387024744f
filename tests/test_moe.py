"""Clown-car MoE on tiny seeded Llamas: expert tensors equal their sources, router rows equal each gate
mode's formula recomputed here (hidden states from transformers' own LlamaForCausalLM), the output
loads in transformers as Mixtral / Qwen2-MoE and matches merger's engine, and dense invariants hold."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from merger import synth
from merger.pipeline import build_recipe
from merger.plan import tensor_seed
from merger.recipe_file import load_recipe

CODE = ["def add(a, b):", "import numpy as np"]
STORY = ["Once upon a time", "The king said to the people"]
MATH = ["The derivative of x squared is two x."]
MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
L, D = 4, 64  # tiny_models: 4 layers, hidden 64


def build(tmp_path: Path, recipe: dict, name: str = "out", **kw) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return build_recipe(load_recipe(path), tmp_path / name, progress=False, **kw)


def moe(base: Path, *experts: dict, gate_mode: str = "hidden", k: int = 2, **extra) -> dict:
    return {"base_model": str(base), "gate_mode": gate_mode, "experts_per_token": k, "experts": list(experts),
            **extra}


def expert(path: Path, pos: list[str] | None = None, neg: list[str] | None = None, **extra) -> dict:
    e = {"source_model": str(path), **extra}
    if pos:
        e["positive_prompts"] = pos
    if neg:
        e["negative_prompts"] = neg
    return e


@functools.lru_cache(maxsize=8)
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def hf_ids(model_dir: Path, prompt: str) -> list[int]:
    """BOS + prompt tokens without other specials, via transformers' tokenizer (independent of ours)."""
    tok = hf_tokenizer(model_dir)
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def engine_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from merger.engine.model import load_model

    return load_model(path, dtype=torch.float32)(torch.tensor([ids]))[0]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def last_token_states(model, ids: list[int], where: str) -> torch.Tensor:
    """[L, D] at the last token: 'layer_input' from output_hidden_states, 'mlp_input' from MLP pre-hooks."""
    with torch.no_grad():
        if where == "layer_input":
            out = model(torch.tensor([ids]), output_hidden_states=True)
            return torch.stack(out.hidden_states[:L])[:, 0, -1]
        seen = []
        hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, -1].clone()))
                 for layer in model.model.layers]
        model(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        return torch.stack(seen)


# --- layout ---------------------------------------------------------------------------------
def test_expert_and_base_tensors_are_copied_exactly(tmp_path, tiny_models, load_weights):
    m = tiny_models
    out = build(tmp_path, moe(m["base"], expert(m["ft_a"], CODE, STORY), expert(m["ft_b"], STORY),
                              expert(m["ft_c"], MATH), gate_mode="cheap_embed", dtype="float32"))
    got = load_weights(out)
    base = load_weights(m["base"])
    srcs = [load_weights(m[k]) for k in ("ft_a", "ft_b", "ft_c")]
    want_names = {n for n in base if ".mlp." not in n}
    for i in range(L):
        want_names.add(f"model.layers.{i}.block_sparse_moe.gate.weight")
        for j, src in enumerate(srcs):
            for proj, w in MLP.items():
                name = f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight"
                want_names.add(name)
                assert_close(got[name], src[f"model.layers.{i}.mlp.{proj}.weight"], rtol=0, atol=0)
    assert set(got) == want_names
    for name in base:
        if ".mlp." not in name:
            assert_close(got[name], base[name], rtol=0, atol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (3, 2, 128)
    assert cfg["sliding_window"] is None and cfg["router_aux_loss_coef"] == 0.001
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5 and cfg["head_dim"] == 16
    assert "attention_bias" not in cfg and "mlp_bias" not in cfg


def test_cheap_embed_rows_with_negative_prompts(tmp_path, tiny_models, load_weights):
    m = tiny_models
    experts = [(m["ft_a"], CODE, STORY), (m["ft_b"], STORY, None), (m["ft_c"], MATH, CODE[:1])]
    out = build(tmp_path, moe(m["base"], *(expert(*e) for e in experts), gate_mode="cheap_embed"))
    got = load_weights(out)
    embed = load_weights(m["base"])["model.embed_tokens.weight"]

    def f(prompts: list[str]) -> torch.Tensor:
        return unit(sum(embed[hf_ids(m["base"], p)].sum(dim=0) for p in prompts))

    want = torch.stack([unit(f(pos) - f(neg)) if neg else f(pos) for _, pos, neg in experts])
    for i in range(L):
        assert_close(got[f"model.layers.{i}.block_sparse_moe.gate.weight"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, where", [("hidden", "layer_input"), ("router_input", "mlp_input")])
def test_prompt_state_rows_match_transformers(tmp_path, tiny_models, load_weights, mode, where):
    """hidden: state entering each layer; router_input: each layer's MLP input; last prompt token,
    mean over prompts, positives minus negatives, L2-normalised — states from transformers' Llama."""
    m = tiny_models
    experts = [(m["ft_a"], CODE, STORY), (m["ft_b"], STORY, MATH), (m["ft_c"], MATH, None)]
    out = build(tmp_path, moe(m["base"], *(expert(*e) for e in experts), gate_mode=mode))
    got = load_weights(out)
    ref = hf_model(m["base"])

    def f(prompts: list[str]) -> torch.Tensor:
        return torch.stack([last_token_states(ref, hf_ids(m["base"], p), where) for p in prompts]).mean(dim=0)

    rows = [unit(f(pos) - f(neg)) if neg else unit(f(pos)) for _, pos, neg in experts]  # each [L, D]
    for i in range(L):
        want = torch.stack([r[i] for r in rows])
        assert_close(got[f"model.layers.{i}.block_sparse_moe.gate.weight"], want, rtol=1e-4, atol=1e-5)
    # the two modes really differ: router_input is not the same vector as hidden
    if mode == "router_input":
        hidden = unit(last_token_states(ref, hf_ids(m["base"], MATH[0]), "layer_input"))
        assert (hidden[1:] - got["model.layers.1.block_sparse_moe.gate.weight"][2]).abs().max() > 0.1


def test_random_gates_are_seeded_and_repeatable(tmp_path, tiny_models, load_weights):
    m = tiny_models
    r = moe(m["base"], expert(m["ft_a"]), expert(m["ft_b"]), expert(m["ft_c"]), gate_mode="random")
    a = load_weights(build(tmp_path, r, "a", seed=7))
    b = load_weights(build(tmp_path, r, "b", seed=7))
    c = load_weights(build(tmp_path, r, "c", seed=8))
    want = torch.randn((L, 3, D), generator=torch.Generator().manual_seed(7))
    for i in range(L):
        name = f"model.layers.{i}.block_sparse_moe.gate.weight"
        assert_close(a[name], want[i], rtol=0, atol=0)
        assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_uniform_random_gates(tmp_path, tiny_models, load_weights):
    m = tiny_models
    r = moe(m["base"], expert(m["ft_a"]), expert(m["ft_b"]), gate_mode="uniform_random")
    got = load_weights(build(tmp_path, r, seed=3))
    u = torch.rand((L, 2, D), generator=torch.Generator().manual_seed(3))
    want = (2 * u - 1) / D**0.5
    stacked = torch.stack([got[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(L)])
    assert_close(stacked, want)
    assert stacked.abs().max() <= D**-0.5


# --- transformers and the engine ------------------------------------------------------------
def test_mixtral_loads_in_transformers_and_matches_engine(tmp_path, tiny_models):
    m = tiny_models
    out = build(tmp_path, moe(m["base"], expert(m["ft_a"], CODE, STORY), expert(m["ft_b"], STORY),
                              expert(m["ft_c"], MATH), k=2))
    model = hf_model(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    ids = hf_ids(out, "def add(a, b):\n    return a + b")
    assert_close(hf_logits(model, ids), engine_logits(out, ids), rtol=0, atol=1e-4)


def test_copies_of_one_model_give_its_dense_logits(tmp_path, tiny_models, capfd):
    """Sparse upcycling: experts are all the dense MLP, routing weights sum to 1 -> the dense model."""
    m = tiny_models
    out = build(tmp_path, moe(m["ft_a"], *(expert(m["ft_a"]) for _ in range(3)), gate_mode="random", k=2))
    err = capfd.readouterr().err
    assert "experts[1] and experts[0] both use" in err and "sparse upcycling" in err
    ids = hf_ids(out, "Once upon a time there was a little fox")
    assert_close(hf_logits(hf_model(out), ids), hf_logits(hf_model(m["ft_a"]), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True], ids=["mixtral", "qwen2_moe"])
def test_mistral_base_keeps_its_sliding_window(tmp_path, shared):
    """Experts = the Mistral's own MLP (and a silenced shared expert): the MoE must reproduce the
    windowed dense Mistral, which differs from the same weights without a window."""
    root = tmp_path / "models"
    synth.make_llama(root / "base", seed=10, model_type="mistral", sliding_window=4)
    extra = {"shared_experts": [expert(root / "base", MATH, residual_scale=0.0)]} if shared else {}
    out = build(tmp_path, moe(root / "base", expert(root / "base"), expert(root / "base"), gate_mode="random",
                              k=1, **extra))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window"] == 4 and cfg["num_experts_per_tok"] == 1
    ids = hf_ids(out, "import numpy as np\nx = np.zeros((3, 4))")
    assert len(ids) > 8  # longer than the window, so the window matters
    got = hf_logits(hf_model(out), ids)
    assert_close(got, hf_logits(hf_model(root / "base"), ids), rtol=0, atol=1e-5)
    assert_close(got, engine_logits(out, ids), rtol=0, atol=1e-4)
    unwindowed = json.loads((root / "base" / "config.json").read_text()) | {"sliding_window": None}
    (root / "base" / "config.json").write_text(json.dumps(unwindowed))
    assert (got - hf_logits(hf_model(root / "base"), ids)).abs().max() > 1e-3


def test_tied_embeddings_stay_tied(tmp_path, load_weights):
    root = tmp_path / "models"
    base = synth.make_llama(root / "base", seed=20, tie=True)
    synth.make_llama(root / "ft", seed=21, base=base, tie=True)
    out = build(tmp_path, moe(root / "base", expert(root / "ft", CODE), expert(root / "base", STORY)))
    got = load_weights(out)
    assert "lm_head.weight" not in got
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = hf_model(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = hf_ids(out, "The king said")
    assert_close(hf_logits(model, ids), engine_logits(out, ids), rtol=0, atol=1e-4)


# --- shared expert (Qwen2-MoE) ----------------------------------------------------------------
def test_qwen2_moe_with_shared_expert(tmp_path, tiny_models, load_weights):
    m = tiny_models
    shared = expert(m["base"], MATH + STORY[:1])
    out = build(tmp_path, moe(m["base"], expert(m["ft_a"], CODE), expert(m["ft_b"], STORY),
                              expert(m["ft_c"], MATH), shared_experts=[shared]))
    got = load_weights(out)
    base, srcs = load_weights(m["base"]), [load_weights(m[k]) for k in ("ft_a", "ft_b", "ft_c")]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["model_type"] == "qwen2_moe"
    assert (cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]) == (3, 128, 128)
    assert cfg["norm_topk_prob"] is True and cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []
    ref = hf_model(m["base"])
    pos = torch.stack([last_token_states(ref, hf_ids(m["base"], p), "layer_input") for p in shared["positive_prompts"]])
    shared_rows = unit(pos.mean(dim=0))  # [L, D]
    for i in range(L):
        p = f"model.layers.{i}."
        for proj in MLP:
            for j, src in enumerate(srcs):
                assert_close(got[f"{p}mlp.experts.{j}.{proj}.weight"], src[f"{p}mlp.{proj}.weight"], rtol=0, atol=0)
            assert_close(got[f"{p}mlp.shared_expert.{proj}.weight"], base[f"{p}mlp.{proj}.weight"], rtol=0, atol=0)
        assert got[f"{p}mlp.gate.weight"].shape == (3, D)
        assert_close(got[f"{p}mlp.shared_expert_gate.weight"], shared_rows[i:i + 1], rtol=1e-4, atol=1e-5)
        for proj, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):  # a Llama has no q/k/v bias
            assert torch.equal(got[f"{p}self_attn.{proj}.bias"], torch.zeros(rows))
    model = hf_model(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    ids = hf_ids(out, "Question: what is the capital of France? Answer:")
    assert_close(hf_logits(model, ids), engine_logits(out, ids), rtol=0, atol=1e-4)


def test_qwen2_moe_zero_biases_and_silent_shared_expert_give_dense_logits(tmp_path, tiny_models):
    """Routed experts all the base MLP, shared expert scaled to zero (residual_scale 0): the Qwen2-MoE
    must compute exactly the dense base, which also shows the zero q/k/v biases change nothing."""
    m = tiny_models
    shared = expert(m["ft_b"], STORY, residual_scale=0.0)
    out = build(tmp_path, moe(m["base"], expert(m["base"]), expert(m["base"]), gate_mode="random", k=1,
                              shared_experts=[shared]))
    ids = hf_ids(out, "for i in range(10):")
    assert_close(hf_logits(hf_model(out), ids), hf_logits(hf_model(m["base"]), ids), rtol=0, atol=1e-5)


# --- mergekit's per-expert knobs, dtypes, sharding, card --------------------------------------------
def test_noise_scale_and_residual_scale(tmp_path, tiny_models, load_weights):
    m = tiny_models
    r = moe(m["base"], expert(m["ft_a"], noise_scale=0.01, residual_scale=0.5),
            expert(m["ft_b"], residual_scale=2.0), gate_mode="random")
    got = load_weights(build(tmp_path, r, "a", seed=5))
    again = load_weights(build(tmp_path, r, "b", seed=5))
    a, b = load_weights(m["ft_a"]), load_weights(m["ft_b"])
    for i in range(L):
        for proj, w in MLP.items():
            src = f"model.layers.{i}.mlp.{proj}.weight"
            name = f"model.layers.{i}.block_sparse_moe.experts.0.{w}.weight"
            noise = 0.01 * torch.randn(a[src].shape, generator=torch.Generator().manual_seed(tensor_seed(5, name)))
            scale = 0.5 if proj == "down_proj" else 1.0
            assert_close(got[name], (a[src] + noise) * scale)
            assert torch.equal(got[name], again[name])
            assert abs(float((got[name] / scale - a[src]).std()) - 0.01) < 0.002
            other = f"model.layers.{i}.block_sparse_moe.experts.1.{w}.weight"
            assert_close(got[other], b[src] * (2.0 if proj == "down_proj" else 1.0), rtol=0, atol=0)


@pytest.mark.parametrize("keys, want", [({"dtype": "bfloat16"}, torch.bfloat16),
                                        ({"dtype": "bfloat16", "out_dtype": "float16"}, torch.float16)])
def test_output_dtype(tmp_path, tiny_models, load_weights, keys, want):
    m = tiny_models
    out = build(tmp_path, moe(m["base"], expert(m["ft_a"], CODE), expert(m["ft_b"], STORY), gate_mode="cheap_embed",
                              **keys))
    got = load_weights(out)
    assert {t.dtype for t in got.values()} == {want}
    src = load_weights(m["ft_a"])["model.layers.2.mlp.up_proj.weight"]
    assert torch.equal(got["model.layers.2.block_sparse_moe.experts.0.w3.weight"], src.to(want))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(want).removeprefix("torch.")


def test_sharded_output_equals_single_file(tmp_path, tiny_models, load_weights):
    m = tiny_models
    r = moe(m["base"], expert(m["ft_a"], CODE), expert(m["ft_b"], STORY), gate_mode="cheap_embed")
    one = build(tmp_path, r, "one")
    many = build(tmp_path, r, "many", shard_bytes=200_000)
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    a, b = load_weights(one), load_weights(many)
    assert set(index["weight_map"]) == set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k])
    hf_model(many)  # transformers reads the index
    assert not [p for p in tmp_path.iterdir() if "merger-tmp" in p.name]


def test_model_card_and_recipe(tmp_path, tiny_models):
    m = tiny_models
    out = build(tmp_path, moe(m["base"], expert(m["ft_a"], CODE, STORY[:1]), expert(m["ft_b"], STORY), k=1))
    card = (out / "README.md").read_text()
    # absolute local paths are cut to their last component before a card or recipe leaves the machine
    for text in ("base model: `base`", "Expert 0: `ft_a`", "Expert 1: `ft_b`", "gate mode: `hidden`",
                 "experts per token: 1 of 2", "positive prompts: `def add(a, b):`, `import numpy as np`",
                 "negative prompts: `Once upon a time`", "MixtralForCausalLM"):
        assert text in card, text
    assert str(tmp_path) not in card
    saved = (out / "merger_config.yml").read_text()
    assert saved.strip() in card and yaml.safe_load(saved)["experts"][1]["source_model"] == "ft_b"
    assert (out / "tokenizer.json").is_file()


def test_similar_prompts_warn_about_indistinct_rows(tmp_path, tiny_models, capfd):
    """Prompts ending in the same token give identical layer-0 `hidden` rows (the embedding output)."""
    m = tiny_models
    build(tmp_path, moe(m["base"], expert(m["ft_a"], ["x = 1"]), expert(m["ft_b"], ["y = 1"]), k=1))
    err = capfd.readouterr().err
    assert "experts[0] and experts[1] get near-identical router rows in layer(s) 0" in err


def test_readme_gate_table_matches_registry():
    from merger.listing import gate_rows, markdown_table

    rows = [r for r in gate_rows() if r["plugin"] == "merger.builtin"]
    table = markdown_table(rows, ["name", "prompts", "parameters", "description"])
    assert table in (Path(__file__).parent.parent / "README.md").read_text()


def test_shared_expert_may_have_its_own_width(tmp_path, tiny_models):
    """Qwen2-MoE sizes the shared expert separately (shared_expert_intermediate_size)."""
    m = tiny_models
    wide = tmp_path / "wide"
    synth.make_llama(wide, seed=30, intermediate=96)
    out = build(tmp_path, moe(m["base"], expert(m["ft_a"], CODE), expert(m["ft_b"], STORY),
                              shared_experts=[expert(wide, MATH)]))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]) == (128, 96)
    ids = hf_ids(out, "print(i * i)")
    assert_close(hf_logits(hf_model(out), ids), engine_logits(out, ids), rtol=0, atol=1e-4)
