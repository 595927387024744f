"""expert_delta router rows checked against a direct SVD / mean of each expert's gate_proj change:
low-rank and noisy changes, through the power iteration and through the exact fallback (a budget of
one step), and in the MoE that merger builds from the example recipe."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merger
import merger_delta_gates
from merger import plugins, synth
from merger.moe.base import ExpertPrompts, GateContext

EXAMPLE = Path(__file__).parents[1] / "examples" / "expert_delta.yaml"
GATE = "model.layers.{}.mlp.gate_proj.weight"


@pytest.fixture
def delta_gates_plugin():
    """Entry points are not loaded under pytest: register the module in-process, then unregister."""
    with plugins.registered(merger_delta_gates, "delta_gates"):
        yield


def reference_row(delta: torch.Tensor, mode: str) -> torch.Tensor:
    """svd: Vh[0] of Δ signed so that 1ᵀΔv ≥ 0; mean: Δᵀ1 normalised. Unit length either way."""
    d = delta.double()
    if mode == "mean":
        v = d.sum(0)
    else:
        v = torch.linalg.svd(d, full_matrices=False).Vh[0]
        v = v if float(d.sum(0) @ v) >= 0 else -v
    return (v / v.norm()).float()


def init(weights: dict[str | int, dict[str, torch.Tensor]], layers: int, experts: int, hidden: int,
         tmp_path: Path, **params) -> torch.Tensor:
    """Run the initializer on in-memory weights: key None is the base, 0..E-1 the experts."""
    cls = merger_delta_gates.ExpertDelta
    ctx = GateContext(num_layers=layers, hidden_size=hidden, experts=[ExpertPrompts(f"experts[{j}]")
                      for j in range(experts)], generator=torch.Generator().manual_seed(0),
                      params=cls.Params(**params), base_path=tmp_path,
                      weight_reader=lambda row, name: weights[row][name])
    return cls().init_gates(ctx)


def low_rank_experts(g: torch.Generator, layers: int, experts: int, f: int, d: int, noise: float):
    base = {GATE.format(i): torch.randn(f, d, generator=g) for i in range(layers)}
    weights: dict = {None: base}
    for j in range(experts):
        # a rank-2 change with a clear top direction, plus noise: what a LoRA-style fine-tune leaves
        weights[j] = {n: w + 3 * torch.randn(f, 1, generator=g) @ torch.randn(1, d, generator=g)
                      + torch.randn(f, 1, generator=g) @ torch.randn(1, d, generator=g)
                      + noise * torch.randn(f, d, generator=g) for n, w in base.items()}
    return weights


@pytest.mark.parametrize("mode", ["svd", "mean"])
@pytest.mark.parametrize("noise", [0.01, 10.0])
@pytest.mark.parametrize("iterations", [1, 300])  # 1: never converges, so the exact SVD answers
def test_rows_match_reference(mode, noise, iterations, tmp_path):
    L, E, F, D = 2, 3, 48, 16
    weights = low_rank_experts(torch.Generator().manual_seed(7), L, E, F, D, noise)
    rows = init(weights, L, E, D, tmp_path, mode=mode, iterations=iterations)
    assert rows.shape == (L, E, D) and rows.dtype == torch.float32
    for i in range(L):
        for j in range(E):
            delta = weights[j][GATE.format(i)] - weights[None][GATE.format(i)]
            torch.testing.assert_close(rows[i, j], reference_row(delta, mode), atol=2e-5, rtol=0)


def test_expert_equal_to_base_gets_zero_row(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = {GATE.format(0): torch.randn(8, 4, generator=g)}
    other = {GATE.format(0): w[GATE.format(0)] + torch.randn(8, 4, generator=g)}
    rows = init({None: w, 0: w, 1: other}, 1, 2, 4, tmp_path)
    torch.testing.assert_close(rows[0, 0], torch.zeros(4))
    torch.testing.assert_close(rows[0, 1].norm(), torch.tensor(1.0))


def test_example_recipe_builds_mixtral_with_reference_routers(delta_gates_plugin, tmp_path):
    names = ("ft-a", "ft-b", "ft-c")
    base = synth.make_llama(tmp_path / "models" / "base", seed=0)
    experts = [synth.make_llama(tmp_path / "models" / n, seed=s, base=base) for s, n in enumerate(names, 1)]
    merger.build(EXAMPLE, tmp_path / "out", options={"base_dir": str(tmp_path)}, progress=False)
    out = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(str(f)))
    for i in range(4):
        router = out[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        want = torch.stack([reference_row(e[GATE.format(i)] - base[GATE.format(i)], "svd") for e in experts])
        torch.testing.assert_close(router, want, atol=2e-5, rtol=0)
        # the experts' own MLPs are carried over unchanged (w1 = gate_proj)
        torch.testing.assert_close(out[f"model.layers.{i}.block_sparse_moe.experts.1.w1.weight"],
                                   experts[1][GATE.format(i)])
