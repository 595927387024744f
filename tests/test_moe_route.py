"""`merger route`: routing computed on merger's engine equals what transformers' own Mixtral /
Qwen2-MoE routers compute (their router_logits), printed as text or JSON; plus gate plugins."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch.testing import assert_close
from typer.testing import CliRunner

from merger import GateInitializer, hookimpl, plugins
from merger.cli import app
from merger.moe.route import route_report
from test_moe import CODE, MATH, STORY, build, expert, hf_ids, hf_model, moe

runner = CliRunner()
PROMPTS = ["def add(a, b):", "Once upon a time there was a little fox"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models) -> dict:
    m, root = tiny_models, tmp_path_factory.mktemp("route")
    experts = (expert(m["ft_a"], CODE, STORY), expert(m["ft_b"], STORY), expert(m["ft_c"], MATH))
    return {
        "mixtral": build(root, moe(m["base"], *experts, k=2), "mixtral"),
        "qwen2_moe": build(root, moe(m["base"], *experts, k=2, shared_experts=[expert(m["base"], MATH)]), "qwen"),
    }


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_report_matches_transformers_router(arch, built):
    out = built[arch]
    report = route_report(out, PROMPTS)
    model = hf_model(out)
    assert report.top_k == 2 and report.experts == ["ft_a", "ft_b", "ft_c"]
    for prompt, got in zip(PROMPTS, report.prompts):
        ids = hf_ids(out, prompt)
        assert got.tokens == len(ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # L x [T, E]
        assert len(logits) == len(got.layers) == 4
        for lr, lg in zip(got.layers, logits):
            probs = torch.softmax(lg.float(), dim=-1)
            w, e = torch.topk(probs, 2, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)  # Mixtral always; our Qwen2-MoE sets norm_topk_prob
            assert lr.experts == e[-1].tolist()
            assert_close(torch.tensor(lr.weights), w[-1], rtol=0, atol=1e-5)
            share = torch.zeros_like(probs).scatter(-1, e, w).mean(dim=0)
            assert_close(torch.tensor(lr.share), share, rtol=0, atol=1e-5)
            assert abs(sum(lr.share) - 1) < 1e-5


def test_cli_text_and_json(built):
    out = built["mixtral"]
    res = runner.invoke(app, ["route", str(out), *PROMPTS])
    assert res.exit_code == 0, res.stderr
    text = res.stdout
    assert "experts: e0 = ft_a, e1 = ft_b, e2 = ft_c" in text
    assert all(repr(p) in text for p in PROMPTS) and text.count("layer  3:") == 2
    res = runner.invoke(app, ["route", str(out), PROMPTS[0], "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    want = route_report(out, PROMPTS[:1]).to_dict()
    assert data == json.loads(json.dumps(want))


@pytest.mark.parametrize("args, needle", [
    (["{dense}", "hello"], "is not an MoE"),
    (["{missing}", "hello"], "does not exist"),
    (["{moe}", "hello", "--dtype", "int3"], "--dtype"),
])
def test_cli_errors(args, needle, built, tiny_models, tmp_path):
    paths = {"dense": tiny_models["base"], "missing": tmp_path / "nope", "moe": built["mixtral"]}
    res = runner.invoke(app, ["route", *(a.format(**paths) for a in args)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


# --- a gate plugin, through the public hook --------------------------------------------------
class DeltaGate(GateInitializer):
    """Row = scale × the mean row of what fine-tuning changed in the expert's gate_proj."""

    name = "delta_gate"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 1.0

    def init_gates(self, ctx):
        rows = []
        for i in range(ctx.num_layers):
            name = f"model.layers.{i}.mlp.gate_proj.weight"
            base = ctx.weight(name)
            rows.append(torch.stack([(ctx.weight(name, j) - base).mean(dim=0) for j in range(ctx.num_experts)]))
        return ctx.params.scale * torch.stack(rows)


class Registers:
    @hookimpl
    def merger_register_gate_initializers(self, register) -> None:
        register(DeltaGate)


def test_gate_plugin_with_parameters(tmp_path, tiny_models, load_weights):
    m = tiny_models
    with plugins.registered(Registers(), "test-delta-gate"):
        out = build(tmp_path, moe(m["base"], expert(m["ft_a"]), expert(m["ft_b"]), gate_mode="delta_gate",
                                  gate_parameters={"scale": 2.5}))
    got, base = load_weights(out), load_weights(m["base"])
    srcs = [load_weights(m[k]) for k in ("ft_a", "ft_b")]
    for i in range(4):
        name = f"model.layers.{i}.mlp.gate_proj.weight"
        want = torch.stack([2.5 * (s[name] - base[name]).mean(dim=0) for s in srcs])
        assert_close(got[f"model.layers.{i}.block_sparse_moe.gate.weight"], want)
    assert "gate mode: `delta_gate`" in (out / "README.md").read_text()


def test_moe_layers_follow_qwen2_moe_sparsity():
    from merger.moe.route import moe_layers

    assert moe_layers({"model_type": "mixtral", "num_hidden_layers": 3}) == [0, 1, 2]
    cfg = {"model_type": "qwen2_moe", "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert moe_layers(cfg) == [1, 5]  # transformers: sparse where (i + 1) % step == 0 and i not dense
