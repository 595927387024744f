"""The overlapped executor (read-ahead, compute, write-behind) writes exactly what computing each tensor
in turn and writing it would, for every canonical recipe; its memory stays within (inputs + 2) x the
largest tensor whatever the shard size; and its threads stop cleanly when a tensor fails."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merger.io.writer import write_tensors
from merger.pipeline import build_recipe, prepare
from merger.recipe_file import load_recipe
from merger.stream import Budget, BufferPool

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_overlapped_build_equals_the_serial_computation(path, demo_root, tmp_path):
    recipe = load_recipe(path)
    options = {"base_dir": str(demo_root)}
    out = build_recipe(recipe, tmp_path / "out", seed=7, options=options, progress=False)
    prepared = prepare(load_recipe(path), options, seed=7)
    for step in prepared.plan.prepare:
        step()
    serial = {t.name: t.compute().to(t.dtype) for t in prepared.plan.tensors}
    (tmp_path / "serial").mkdir()
    write_tensors(tmp_path / "serial", serial, metadata=prepared.plan.metadata)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "serial" / "model.safetensors").read_bytes()


def test_a_failing_tensor_stops_the_threads_and_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    import threading

    from typer.testing import CliRunner

    from merger.cli import app
    from merger.methods.linear import Linear

    calls = []
    real = Linear.merge

    def merge(self, tensors, base, params, model_params, ctx):
        calls.append(ctx.name)
        if len(calls) == 7:
            raise RuntimeError("boom")
        return real(self, tensors, base, params, model_params, ctx)

    monkeypatch.setattr(Linear, "merge", merge)
    r = {"merge_method": "linear", "models": [{"model": str(tiny_models[k]), "parameters": {"weight": 1}}
                                             for k in ("ft_a", "ft_b")]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    res = CliRunner().invoke(app, ["build", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1 and "boom" in res.stderr and not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("merger-")]


def test_budget_blocks_until_bytes_are_given_back():
    import threading

    b = Budget(100)
    assert b.take(60)
    got = []
    t = threading.Thread(target=lambda: got.append(b.take(60)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # 60 + 60 > 100: waits
    b.give(60)
    t.join(5)
    assert got == [True] and b.used == 60
    b.give(60)
    assert b.take(500) and b.used == 500  # a request larger than the limit still goes when nothing else is held
    pool = BufferPool()
    buf = pool.take(1000)
    pool.give(buf)
    assert pool.take(800).data_ptr() == buf.data_ptr()  # reused, not a fresh (page-faulting) allocation


@pytest.mark.slow
def test_peak_memory_stays_within_the_bound_when_the_shard_is_larger(tmp_path):
    """A 48-tensor merge whose single output shard (384 MB) is larger than the bound: the writer streams."""
    cfg = {"vocab_size": 4, "hidden_size": 1024, "num_hidden_layers": 0, "architectures": ["Test"]}
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tensors = {f"t{k:02d}.weight": torch.randn(2048, 1024, generator=g) for k in range(48)}  # 8 MB each
        write_tensors(tmp_path / name, tensors)
        (tmp_path / name / "config.json").write_text(__import__("json").dumps(cfg))
        del tensors
    r = {"merge_method": "linear", "models": [{"model": str(tmp_path / n), "parameters": {"weight": 0.5}}
                                             for n in ("a", "b")]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    code = "import sys; from merger.cli import main; sys.argv[0] = 'merger'; main()"

    def peak(*args: str) -> int:
        proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()
        return usage.ru_maxrss * 1024

    startup = peak("import merger.cli, merger.pipeline, torch")
    used = peak(code, "build", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q", "--out-shard-size", "5GB")
    largest = 2048 * 1024 * 4
    bound = startup + (2 + 2) * largest + 256 * 2**20
    out_bytes = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert out_bytes > bound - startup  # the shard alone would not fit in the bound
    assert used <= bound, (used / 2**20, bound / 2**20)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp"])
def test_cuda_merges_match_the_cpu(method, tiny_models, tmp_path, load_weights):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = {k: str(v) for k, v in tiny_models.items()}
    per = {"weight": 0.5, "density": 0.5} if method != "slerp" else {}
    r = {"merge_method": method, "models": [{"model": m["ft_a"], "parameters": {"weight": 0.5, **per}}]}
    if method != "linear":
        r["base_model"] = m["base"]
    if method == "slerp":
        r = {**r, "parameters": {"t": 0.3}, "models": [{"model": m["ft_a"]}]}
    else:
        r["models"].append({"model": m["ft_b"], "parameters": {"weight": 0.5, **per}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = load_weights(build_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / device, seed=3,
                                                 options={"device": device}, progress=False))
    for name, t in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][name], t, atol=1e-5, rtol=1e-5)


def test_unknown_or_missing_device_is_one_line(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from merger.cli import app

    r = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    for device, needle in (("mps", "merges run on cpu or cuda"), ("nonsense!", "is not a device")) + (
            () if torch.cuda.is_available() else (("cuda", "no CUDA device"),)):
        res = CliRunner().invoke(app, ["build", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q",
                                       "--device", device])
        assert res.exit_code == 1 and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
