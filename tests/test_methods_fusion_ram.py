"""arcee_fusion, ram and ramplus_tl against plain recomputations written here from their definitions
(entry-by-entry loops for RAM, a full sort for Fusion's quartiles), their edge cases, streaming in
many blocks, and one `merger build` each through the CLI with a bad-parameter recipe rejected."""
from __future__ import annotations

import pytest
import torch
import yaml
from cli_checks import assert_one_line_error
from torch.testing import assert_close
from typer.testing import CliRunner

from merger import plugins
from merger.cli import app
from merger.methods import sparsify
from merger.methods.base import MergeContext, NoParams


def method(name):
    return plugins.methods()[name]


def ctx(dtype=torch.float64) -> MergeContext:
    return MergeContext(name="w", generator=torch.Generator().manual_seed(0), dtype=dtype)


def sparse_family(seed: int, shape=(12, 16), n: int = 3, keep: float = 0.4, dtype=torch.float64):
    """A base and n fine-tunes whose task vectors are sparse, overlapping at random, with some
    entries changed by less than 1e-5 (inactive under the default epsilon)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        mask = torch.rand(shape, generator=g, dtype=torch.float64) < keep
        tiny = (torch.rand(shape, generator=g, dtype=torch.float64) < 0.1) & ~mask
        delta = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) * mask + 4e-6 * tiny
        out.append((base + delta).to(dtype))
    return base.to(dtype), out


# ---------------------------------------------------------------- RAM

def ref_ram(ts, base, epsilon, plus=False, r=0.0, alpha=0.0):
    """Entry by entry: inactive → base; one active model → its change (× λᵢ for RAM+); several → mean."""
    b = base.double().reshape(-1).tolist()
    ds = [[x - y for x, y in zip(t.double().reshape(-1).tolist(), b)] for t in ts]
    active = [[abs(v) > epsilon for v in d] for d in ds]
    count = [sum(a[k] for a in active) for k in range(len(b))]
    lam = [1.0] * len(ts)
    if plus:
        for i, a in enumerate(active):
            shared = sum(1 for k in range(len(b)) if a[k] and count[k] > 1)
            unique = sum(1 for k in range(len(b)) if a[k] and count[k] == 1)
            if unique:
                lam[i] = 1 + r * min(max(shared / unique, 0.0), alpha)
    out = []
    for k in range(len(b)):
        changes = [(i, ds[i][k]) for i in range(len(ts)) if active[i][k]]
        if not changes:
            out.append(b[k])
        elif len(changes) == 1:
            i, v = changes[0]
            out.append(b[k] + lam[i] * v)
        else:
            out.append(b[k] + sum(v for _, v in changes) / len(changes))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def run(name, ts, base, dtype=torch.float64, **params):
    cls = method(name)
    return cls().merge(ts, base, cls.Params(**params), [NoParams()] * len(ts), ctx(dtype))


@pytest.mark.parametrize("epsilon", [0.0, 1e-5, 0.2])
@pytest.mark.parametrize("shape", [(12, 16), (40,)])
def test_ram_matches_definition(epsilon, shape):
    base, ts = sparse_family(1, shape)
    assert_close(run("ram", ts, base, epsilon=epsilon), ref_ram(ts, base, epsilon), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.05, 1.0), (2.0, 0.5), (0.0, 0.3)])
@pytest.mark.parametrize("keep", [0.2, 0.6])
def test_ramplus_tl_matches_definition(r, alpha, keep):
    base, ts = sparse_family(2, keep=keep)
    got = run("ramplus_tl", ts, base, r=r, alpha=alpha)
    assert_close(got, ref_ram(ts, base, 1e-5, plus=True, r=r, alpha=alpha), rtol=1e-12, atol=1e-12)


def test_ramplus_tl_scales_unique_entries_by_hand():
    base = torch.zeros(6, dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 0, 0, 4.0, 0], dtype=torch.float64)   # shared: 1 entry, unique: 2 → ρ = 1/2
    b = torch.tensor([0, 0, 3.0, 0, 2.0, 0], dtype=torch.float64)     # shared: 1, unique: 1 → ρ = 1
    got = run("ramplus_tl", [a, b], base, r=0.5, alpha=0.8)
    la, lb = 1 + 0.5 * 0.5, 1 + 0.5 * 0.8
    assert_close(got, torch.tensor([la * 1, la * 2, lb * 3, 0, 3.0, 0], dtype=torch.float64))
    assert_close(run("ram", [a, b], base), torch.tensor([1.0, 2.0, 3.0, 0, 3.0, 0], dtype=torch.float64))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_edge_cases(name):
    base, (a, b, _) = sparse_family(3)
    # Changes below the default epsilon (1e-5) stay at the base; the others come through.
    want = torch.where((a - base).abs() > 1e-5, a, base)
    # Identical models: every change is shared by all, and its mean is the change itself.
    assert_close(run(name, [a, a.clone(), a.clone()], base), want, rtol=0, atol=1e-15)
    # Zero task vectors: the base, exactly.
    assert torch.equal(run(name, [base.clone(), base.clone()], base), base)
    # A model equal to the base changes nothing: the other model's active changes come through whole.
    assert_close(run(name, [a, base.clone()], base), want, rtol=0, atol=1e-15)
    # epsilon 0 with a model equal to the base: no unique entries for it, and no NaN.
    got = run(name, [a, base.clone(), b], base, epsilon=0.0)
    assert_close(got, ref_ram([a, base, b], base, 0.0, plus=name == "ramplus_tl", r=0.1, alpha=0.2),
                 rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_streamed_in_many_blocks(name, monkeypatch):
    monkeypatch.setattr(sparsify, "BLOCK", 40)      # two rows per block
    base, ts = sparse_family(4, shape=(15, 16), n=4)
    got = run(name, ts, base, r=0.5, alpha=1.0) if name == "ramplus_tl" else run(name, ts, base)
    assert_close(got, ref_ram(ts, base, 1e-5, plus=name == "ramplus_tl", r=0.5, alpha=1.0), rtol=1e-12, atol=1e-12)


def test_ram_bf16_keeps_unique_values_exactly():
    base, ts = sparse_family(5, dtype=torch.bfloat16)
    got = run("ram", ts, base, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # Deltas in float32 from the bf16 inputs, the result rounded once to bf16.
    want = ref_ram([t.float() for t in ts], base.float(), 1e-5).to(torch.bfloat16)
    assert torch.equal(got, want)
    count = sum(((t.float() - base.float()).abs() > 1e-5).int() for t in ts)
    owner = sum(t * ((t.float() - base.float()).abs() > 1e-5) for t in ts)
    assert torch.equal(got[count == 1], owner[count == 1])


@pytest.mark.parametrize("name,field,value", [("ram", "epsilon", -1e-3), ("ramplus_tl", "r", -0.1),
                                              ("ramplus_tl", "alpha", -1.0), ("ramplus_tl", "epsilon", float("inf")),
                                              ("ram", "weight", 1.0)])
def test_ram_bad_params(name, field, value):
    with pytest.raises(ValueError):
        method(name).Params(**{field: value})


# ---------------------------------------------------------------- Arcee Fusion

def ref_fusion(t, b):
    """Row KL (float64) of the ε-shifted softmaxes × |Δ|, Tukey's upper fence from sorted quartiles, pick."""
    work = torch.float64 if b.dtype == torch.float64 else torch.float32
    tw, bw = t.to(work), b.to(work)
    p = torch.softmax(t.double(), dim=-1) + 1e-8
    q = torch.softmax(b.double(), dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1).clamp(min=0).to(work)
    score = (tw - bw).abs() * kl.unsqueeze(-1)
    s = torch.sort(score.reshape(-1)).values
    n = s.numel()
    q1, q2, q3 = s[(n - 1) // 4], s[(n - 1) // 2], s[3 * (n - 1) // 4]
    return torch.where(score >= q2 + 1.5 * (q3 - q1), t, b)


def fuse(t, b, dtype=torch.float64):
    return method("arcee_fusion")().merge([t], b, NoParams(), [NoParams()], ctx(dtype))


@pytest.mark.parametrize("shape", [(7, 5), (33, 17), (64,), (3, 4, 6), (1,)])
def test_fusion_matches_definition(shape):
    g = torch.Generator().manual_seed(11)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    t = b + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape, generator=g, dtype=torch.float64)
    got = fuse(t, b)
    assert torch.equal(got, ref_fusion(t, b))
    assert bool(((got == t) | (got == b)).all())     # each entry is one model's value, exactly


def test_fusion_edge_cases():
    g = torch.Generator().manual_seed(12)
    b = torch.randn(10, 8, generator=g, dtype=torch.float64)
    # Identical models: every score is 0, the result is the base.
    assert torch.equal(fuse(b.clone(), b), b)
    # Mostly unchanged (sparse task vector): the quartiles are 0, so every change is an outlier → the other model.
    t = b.clone()
    t[2, 3], t[7, 0], t[9, 5] = 1.0, -2.0, 0.5
    assert torch.equal(fuse(t, b), t)
    # A row shifted by a constant has the base's softmax (KL 0): it keeps the base while others change.
    t = b + 0.3 * torch.randn(10, 8, generator=g, dtype=torch.float64)
    t[4] = b[4] + 1.0
    got = fuse(t, b)
    assert torch.equal(got, ref_fusion(t, b))
    assert torch.equal(got[4], b[4]) and not torch.equal(got, b)


def test_fusion_streamed_in_many_blocks(monkeypatch):
    monkeypatch.setattr(sparsify, "BLOCK", 600)     # 15 rows per block; the quartiles found by counting
    g = torch.Generator().manual_seed(13)
    b = torch.randn(400, 40, generator=g)
    t = b + 0.2 * torch.randn(400, 40, generator=g) * torch.rand(400, 1, generator=g)
    assert torch.equal(fuse(t, b, torch.float32), ref_fusion(t, b))


def test_fusion_bf16_scores_in_float32():
    g = torch.Generator().manual_seed(14)
    b = torch.randn(16, 32, generator=g).bfloat16()
    t = (b.float() + 0.3 * torch.randn(16, 32, generator=g)).bfloat16()
    got = fuse(t, b, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref_fusion(t, b))


# ---------------------------------------------------------------- end to end

runner = CliRunner()


def cli_build(tmp_path, recipe: dict, out: str = "out"):
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return runner.invoke(app, ["build", str(path), str(tmp_path / out), "-q"]), tmp_path / out


def test_ramplus_tl_build_matches_formula(tmp_path, tiny_models, load_weights):
    base, a, b = (load_weights(tiny_models[k]) for k in ("base", "ft_a", "ft_b"))
    name = "model.layers.1.self_attn.q_proj.weight"
    eps = float((a[name] - base[name]).abs().median())     # about half the entries of each model active
    recipe = {"merge_method": "ramplus_tl", "base_model": str(tiny_models["base"]),
              "parameters": {"epsilon": eps, "r": 0.5, "alpha": 2.0},
              "models": [{"model": str(tiny_models["ft_a"])}, {"model": str(tiny_models["ft_b"])}]}
    res, out = cli_build(tmp_path, recipe)
    assert res.exit_code == 0, res.stderr
    got = load_weights(out)[name]
    ds = [m[name] - base[name] for m in (a, b)]            # float32, the compute dtype
    act = [(d.abs() > eps) for d in ds]
    count = act[0].int() + act[1].int()
    assert {0, 1, 2} <= set(count.unique().tolist())       # inactive, unique and shared entries all occur
    lam = [1 + 0.5 * min(int((x & (count > 1)).sum()) / int((x & (count == 1)).sum()), 2.0) for x in act]
    unique = sum(lam[i] * ds[i] * act[i] for i in range(2))
    shared = (ds[0] * act[0] + ds[1] * act[1]) / 2
    want = base[name] + torch.where(count == 1, unique, torch.where(count == 2, shared, 0.0))
    assert_close(got, want)


def test_arcee_fusion_build_matches_formula(tmp_path, tiny_models, load_weights):
    # mergekit's example recipe: the base is listed among the models too.
    recipe = {"merge_method": "arcee_fusion", "base_model": str(tiny_models["base"]), "dtype": "float32",
              "models": [{"model": str(tiny_models["base"])}, {"model": str(tiny_models["ft_a"])}]}
    res, out = cli_build(tmp_path, recipe)
    assert res.exit_code == 0, res.stderr
    got, base, a = load_weights(out), load_weights(tiny_models["base"]), load_weights(tiny_models["ft_a"])
    for name in ("model.layers.2.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.equal(got[name], ref_fusion(a[name], base[name])), name
        assert not torch.equal(got[name], base[name]) and not torch.equal(got[name], a[name]), name


@pytest.mark.parametrize("case,needles", [
    ({"merge_method": "ram", "parameters": {"epsilon": -0.001}}, ("parameters.epsilon", "greater than or equal to 0")),
    ({"merge_method": "ramplus_tl", "parameters": {"alpha": [0.2, -1.0]}}, ("parameters.alpha", "greater than or equal to 0")),
    ({"merge_method": "arcee_fusion", "parameters": {"tt": 0.5}}, ("arcee_fusion has no parameter 'tt'",)),
    ({"merge_method": "arcee_fusion", "extra": True}, ("arcee_fusion merges exactly 2 models (base_model included), got 3",)),
])
def test_bad_recipe_is_one_error_line(tmp_path, tiny_models, case, needles):
    case = dict(case)
    models = [{"model": str(tiny_models["ft_a"])}]
    if case.pop("extra", False):
        models.append({"model": str(tiny_models["ft_b"])})
    recipe = {**case, "base_model": str(tiny_models["base"]), "models": models}
    res, out = cli_build(tmp_path, recipe)
    assert_one_line_error(res.exit_code, res.stderr, out, *needles)
