"""`gate_mode: calibrated` (router rows fitted to every prompt token) and mergekit's gate-prompt
tokenisation (the bos_token text + prompt, even where the tokenizer adds no BOS)."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml
from torch.testing import assert_close

from merger.engine.model import load_model
from merger.engine.tokenizer import load_tokenizer
from merger.errors import RecipeError
from merger.moe.calibrate import MAX_LOGIT_GAP, fit_rows
from merger.moe.route import route_report
from merger.recipe_file import load_recipe
from test_moe import CODE, STORY, build, expert, hf_tokenizer, moe, unit

# Single tokens of the tiny tokenizer (" fox" is one token, ...), three disjoint sets: each expert's
# prompts are words of its own set only, so its tokens are separable from the others' by construction.
WORDS = (["fox", "king", "sea", "cold"], ["def", "add", "self", "int"], ["Question", "what", "who", "many"])


def word_prompts(words: list[str], n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return ["".join(" " + r.choice(words) for _ in range(6)) for _ in range(n)]


TRAIN = [word_prompts(w, 8, 10 + j) for j, w in enumerate(WORDS)]
HELD_OUT = [word_prompts(w, 6, 20 + j) for j, w in enumerate(WORDS)]


def routers(weights: dict[str, torch.Tensor], layers: int = 4) -> torch.Tensor:
    """The Mixtral router rows of every layer, [L, E, D]."""
    return torch.stack([weights[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(layers)])


def token_hits(out, prompt_sets: list[list[str]]) -> torch.Tensor:
    """1.0 where a prompt token (the BOS left out) has its own expert as top-1, per layer and token."""
    report = route_report(out, [p for ps in prompt_sets for p in ps])
    labels = [j for j, ps in enumerate(prompt_sets) for _ in ps]
    return torch.tensor([e == j for j, pr in zip(labels, report.prompts) for lr in pr.layers for e in lr.top1[1:]],
                        dtype=torch.float32)


def copies(m: dict) -> list[dict]:
    """Three experts that are the base itself: the MoE's states are then exactly the base's, which the
    gates were fitted on, so routing measures the rows alone (the router rows still differ)."""
    return [expert(m["base"], p) for p in TRAIN]


@pytest.fixture(scope="module")
def separable(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("calibrated")
    return {mode: build(root, moe(tiny_models["base"], *copies(tiny_models), gate_mode=mode, k=1), mode)
            for mode in ("hidden", "calibrated")}


def test_calibrated_routes_every_token_to_its_expert(separable):
    """Every training token and every held-out token (same construction, other word orders) at every
    layer; hidden's last-token rows misroute more than a tenth of them."""
    for prompts in (TRAIN, HELD_OUT):
        hits = token_hits(separable["calibrated"], prompts)
        assert hits.numel() == 4 * 6 * sum(map(len, prompts)) and hits.mean().item() == 1.0
        assert token_hits(separable["hidden"], prompts).mean().item() < 0.9


def test_calibrated_rows_are_deterministic(separable, tmp_path, tiny_models, load_weights):
    m = tiny_models
    experts = copies(m)
    again = build(tmp_path, moe(m["base"], *experts, gate_mode="calibrated", k=1), "again")
    first, second = load_weights(separable["calibrated"]), load_weights(again)
    for i in range(4):
        name = f"model.layers.{i}.block_sparse_moe.gate.weight"
        assert torch.equal(first[name], second[name])
    # the other seed gives the same rows too: the fit draws no random numbers
    other = build(tmp_path, moe(m["base"], *experts, gate_mode="calibrated", k=1), "other", seed=7)
    assert torch.equal(load_weights(other)["model.layers.2.block_sparse_moe.gate.weight"],
                       first["model.layers.2.block_sparse_moe.gate.weight"])


def reference_loss(v, pos, neg, weight_decay, negative_weight):
    """The objective fit_rows documents, written out again: class-balanced cross-entropy, -log(1 - p)
    on negative tokens, weight decay on the scaled rows."""
    n = len(pos)
    total = 0.5 * weight_decay * (v ** 2).sum()
    for e in range(n):
        p = torch.softmax(pos[e] @ v.transpose(1, 2), dim=-1)[..., e]
        total = total - torch.log(p).mean(dim=1).sum() / n
        if neg[e] is not None:
            pn = torch.softmax(neg[e] @ v.transpose(1, 2), dim=-1)[..., e]
            total = total - negative_weight * torch.log1p(-pn).mean(dim=1).sum() / n
    return total


def synthetic(seed: int = 0, n: int = 12, d: int = 16):
    """Three overlapping Gaussian classes in 2 layers (not separable: the optimum is finite even
    without weight decay), plus negatives for class 0 drawn from class 1's cloud."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, 3, d, generator=g)
    pos = [3 * (centres[:, e, None] + torch.randn(2, n, d, generator=g)) for e in range(3)]
    neg = [3 * (centres[:, 1, None] + torch.randn(2, 5, d, generator=g)), None, None]
    init = torch.randn(2, 3, d, generator=g)
    return pos, neg, init


def test_fit_is_the_documented_objective_at_its_minimum():
    """Without the margin scaling, the rows are the stationary point of the objective recomputed here."""
    pos, neg, init = synthetic()
    w = fit_rows(pos, neg, init, steps=500, weight_decay=1e-2, margin=None)
    scale = torch.cat(pos + [neg[0]], dim=1).norm(dim=-1).mean(dim=1)[:, None, None]
    v = (w * scale).requires_grad_(True)
    xs = [p / scale for p in pos], [None if x is None else x / scale for x in neg]
    reference_loss(v, *xs, 1e-2, 1.0).backward()
    assert v.grad.abs().max().item() < 1e-4
    assert v.detach().abs().max().item() > 0.5  # a real solution, not rows decayed to zero


def test_margin_sets_the_median_margin_and_negatives_push_down():
    pos, neg, init = synthetic(1)
    w = fit_rows(pos, neg, init, margin=4.0)
    for layer in range(2):
        margins = []
        for e, x in enumerate(pos):
            z = x[layer] @ w[layer].T
            margins.append(z[:, e] - torch.cat([z[:, :e], z[:, e + 1:]], dim=1).amax(dim=1))
        assert_close(torch.cat(margins).median(), torch.tensor(4.0), rtol=1e-4, atol=1e-4)
        gaps = torch.cat(pos + [neg[0]], dim=1)[layer] @ w[layer].T
        assert (gaps.amax(dim=1) - gaps.amin(dim=1)).max().item() <= MAX_LOGIT_GAP + 1e-3

    def p0_on_negatives(weight: float) -> float:
        rows = fit_rows(pos, neg, init, negative_weight=weight, margin=None)
        return torch.softmax(neg[0] @ rows.transpose(1, 2), dim=-1)[..., 0].mean().item()

    without, with_neg = p0_on_negatives(0.0), p0_on_negatives(1.0)
    assert with_neg < 0.5 * without, (without, with_neg)


def test_shared_expert_row_stays_router_input(tmp_path, tiny_models, load_weights):
    """A shared expert's gate is a sigmoid outside the softmax: calibrated leaves router_input's row."""
    m = tiny_models
    experts = [expert(m[n], p) for n, p in zip(("ft_a", "ft_b"), TRAIN[:2])]
    shared = [expert(m["ft_c"], TRAIN[2])]
    cal = load_weights(build(tmp_path, moe(m["base"], *experts, gate_mode="calibrated", shared_experts=shared), "c"))
    ri = load_weights(build(tmp_path, moe(m["base"], *experts, gate_mode="router_input", shared_experts=shared), "r"))
    name = "model.layers.1.mlp.shared_expert_gate.weight"
    assert_close(cal[name], ri[name], rtol=0, atol=0)
    assert not torch.equal(cal["model.layers.1.mlp.gate.weight"], ri["model.layers.1.mlp.gate.weight"])


@pytest.mark.parametrize("params, needle", [
    ({"tokens": 0}, "gate_parameters.tokens"),
    ({"tokens": "first"}, "gate_parameters.tokens"),
    ({"steps": 0}, "gate_parameters.steps"),
    ({"learning_rate": -1}, "gate_parameters.learning_rate"),
    ({"temperature": 2}, "gate_parameters"),
])
def test_bad_gate_parameters_are_recipe_errors(params, needle, tmp_path, tiny_models):
    m = tiny_models
    path = tmp_path / "r.yaml"
    recipe = moe(m["base"], expert(m["ft_a"], CODE), expert(m["ft_b"], STORY), gate_mode="calibrated",
                 gate_parameters=params)
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=needle) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_tokens_last_k_trains_on_fewer_tokens(tmp_path, tiny_models, load_weights):
    """tokens: last (= last 1) and tokens: 1 are the same fit; tokens: all is another one."""
    m = tiny_models
    experts = [expert(m[n], p) for n, p in zip(("ft_a", "ft_b", "ft_c"), TRAIN)]
    rows = {}
    for label, tokens in (("last", "last"), ("one", 1), ("all", "all")):
        out = build(tmp_path, moe(m["base"], *experts, gate_mode="calibrated", gate_parameters={"tokens": tokens}),
                    label)
        rows[label] = load_weights(out)["model.layers.3.block_sparse_moe.gate.weight"]
    assert torch.equal(rows["last"], rows["one"]) and not torch.equal(rows["last"], rows["all"])


# --- mergekit's tokenisation of gate prompts -----------------------------------------------------
@pytest.fixture(scope="module")
def no_bos_base(tmp_path_factory, tiny_models):
    """The tiny base with `add_bos_token: false` (as SmolLM2 and many ChatML/Qwen tokenizers say)."""
    path = tmp_path_factory.mktemp("nobos") / "base"
    shutil.copytree(tiny_models["base"], path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


PROMPTS = (["def add(a, b):", "import numpy as np"], ["Once upon a time"])


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_gate_prompts_get_the_bos_text_like_mergekit(mode, tmp_path, tiny_models, no_bos_base, load_weights):
    tok = load_tokenizer(no_bos_base)
    assert tok.bos_token_id is None  # the engine adds no BOS to this model's text
    # mergekit-moe: tokenizer([bos_token + p], add_special_tokens=False), here via transformers
    hf = hf_tokenizer(no_bos_base)
    bos_id = hf.bos_token_id
    ids = {p: [bos_id] + tok.encode(p, add_bos=False) for ps in PROMPTS for p in ps}
    for p, want in ids.items():
        assert hf(hf.bos_token + p, add_special_tokens=False)["input_ids"] == want

    m = tiny_models
    out = build(tmp_path, moe(no_bos_base, expert(m["ft_a"], PROMPTS[0]), expert(m["ft_b"], PROMPTS[1]),
                              gate_mode=mode))
    got = routers(load_weights(out))
    if mode == "hidden":
        model = load_model(no_bos_base)

        def f(prompts):
            return torch.stack([model.layer_states(torch.tensor([ids[p]]))["layer_input"][:, -1]
                                for p in prompts]).mean(dim=0)
        want = torch.stack([unit(f(ps)) for ps in PROMPTS], dim=1)  # [L, E, D]
    else:
        embed = load_weights(no_bos_base)["model.embed_tokens.weight"]
        want = torch.stack([unit(embed[[i for p in ps for i in ids[p]]].sum(dim=0)) for ps in PROMPTS])
        want = want.expand(4, -1, -1)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the routing report tokenises prompts the same way the gates were built
    assert route_report(out, [PROMPTS[1][0]]).prompts[0].tokens == len(ids[PROMPTS[1][0]])
