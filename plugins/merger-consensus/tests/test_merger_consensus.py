"""Consensus merging checked against the paper's formulas recomputed here: a hand-worked tensor,
random tensors, the k=0 invariant (plain task arithmetic), and the example recipe built by merger."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merger
import merger_consensus
from merger import plugins, synth
from merger.errors import MergerError
from merger.methods.base import MergeContext
from merger.methods.task_arithmetic import TaskArithmetic

EXAMPLE = Path(__file__).parents[1] / "examples" / "consensus.yaml"
Consensus = merger_consensus.Consensus


@pytest.fixture
def consensus_plugin():
    """Entry points are not loaded under pytest: register the module in-process, then unregister."""
    with plugins.registered(merger_consensus, "consensus"):
        yield


def ctx(dtype: torch.dtype = torch.float32) -> MergeContext:
    return MergeContext(name="t", generator=torch.Generator().manual_seed(0), dtype=dtype)


def run(tensors, base, k=2, lam=1.0, weights=None, mask_lambdas=None) -> torch.Tensor:
    n = len(tensors)
    mps = [Consensus.ModelParams(weight=w, mask_lambda=m)
           for w, m in zip(weights or [1.0] * n, mask_lambdas or [0.4] * n)]
    return Consensus().merge(tensors, base, Consensus.Params(k=k, **{"lambda": lam}), mps, ctx(base.dtype))


def reference(tensors, base, k, lam, weights, mask_lambdas) -> torch.Tensor:
    """The paper: τ_t = w_t(θ_t − θ_b); τ = Σ τ_t; m_t = |τ_t| ≥ λ_t|τ − τ_t|; θ_b + α·1[Σ m_t ≥ k]·τ."""
    taus = torch.stack([w * (t - base) for w, t in zip(weights, tensors)])
    mtl = taus.sum(0)
    lams = torch.tensor(mask_lambdas).view(-1, *([1] * base.dim()))
    masks = taus.abs() >= lams * (mtl - taus).abs()
    return base + lam * (masks.sum(0) >= k) * mtl


def test_hand_worked_example():
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 1.0, 2.0, 0.1]),
              torch.tensor([1.0, 0.0, 1.0, 0.1]),
              torch.tensor([1.0, 0.0, -2.5, 3.0])]
    # 0: all three agree, kept (sum 3); 1: only model 0 needs it (selfish), dropped;
    # 2: opposing but each large against the rest, kept (sum 0.5); 3: model 2 dominates, dropped.
    torch.testing.assert_close(run(models, base, k=2), torch.tensor([3.0, 0.0, 0.5, 0.0]))
    # k=1 keeps every weight some model needs: all of them here.
    torch.testing.assert_close(run(models, base, k=1), torch.tensor([3.0, 1.0, 0.5, 3.2]))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_matches_formula_on_random_tensors(k):
    g = torch.Generator().manual_seed(k)
    base = torch.randn(16, 8, generator=g)
    models = [base + 0.1 * torch.randn(16, 8, generator=g) for _ in range(3)]
    weights, lams = [1.0, 0.5, -0.3], [0.2, 0.4, 0.6]
    out = run(models, base, k=k, lam=0.7, weights=weights, mask_lambdas=lams)
    torch.testing.assert_close(out, reference(models, base, k, 0.7, weights, lams))


def test_k0_is_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, generator=g)
    models = [base + torch.randn(32, generator=g) for _ in range(2)]
    ta = TaskArithmetic().merge(models, base, TaskArithmetic.Params(**{"lambda": 0.5}),
                                [TaskArithmetic.ModelParams(weight=w) for w in (0.6, 0.4)], ctx())
    torch.testing.assert_close(run(models, base, k=0, lam=0.5, weights=[0.6, 0.4]), ta)


def test_example_recipe_builds_and_matches_formula(consensus_plugin, tmp_path):
    names = ("base", "ft-a", "ft-b", "ft-c")
    w = {"base": synth.make_llama(tmp_path / "models" / "base", seed=0)}
    for s, name in enumerate(names[1:], start=1):
        w[name] = synth.make_llama(tmp_path / "models" / name, seed=s, base=w["base"])
    merger.build(EXAMPLE, tmp_path / "out", options={"base_dir": str(tmp_path)}, progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(w["base"])
    for name, got in out.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        lam = 0.8 if layer is None else 0.8 + 0.2 * layer / 3       # gradient [0.8, 1.0] over 4 layers
        ft_a_mask = 0.3 if "mlp" in name else 0.5                    # ft-a's filter list
        want = reference([w[m][name] for m in names[1:]], w["base"][name], 2, lam,
                         [1.0, 1.0, 0.8], [ft_a_mask, 0.4, 0.4])
        torch.testing.assert_close(got, want, msg=name)


def test_k_above_model_count_is_one_line_error(consensus_plugin, tmp_path):
    base = synth.make_llama(tmp_path / "base", seed=0, layers=1)
    for name in ("a", "b"):
        synth.make_llama(tmp_path / name, seed=1, base=base, layers=1)
    (tmp_path / "r.yaml").write_text(
        f"merge_method: consensus\nbase_model: {tmp_path / 'base'}\nparameters: {{k: 3}}\n"
        f"models: [{{model: {tmp_path / 'a'}}}, {{model: {tmp_path / 'b'}}}]\n")
    with pytest.raises(MergerError, match=r"merge method 'consensus' \(plugin 'consensus'\) on tensor "
                                          r"model\.embed_tokens\.weight: k=3 but only 2 models.*lower k"):
        merger.build(tmp_path / "r.yaml", tmp_path / "out", progress=False)
