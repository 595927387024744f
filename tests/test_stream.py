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

from safetensors.torch import load_file

from merger.io.writer import write_tensors
from merger.pipeline import build_recipe, prepare
from merger.recipe_file import load_recipe
from merger.stream import BufferPool, ReadAhead

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_overlapped_build_equals_the_serial_computation(path, demo_root, tmp_path):
    recipe = load_recipe(path)
    options = {"base_dir": str(demo_root)}
    out = build_recipe(recipe, tmp_path / "out", seed=7, options=options, progress=False)
    prepared = prepare(load_recipe(path), options, seed=7)
    for step in prepared.plan.prepare:
        step()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each merge worker computes: one core, so every sum in one order
    try:
        serial = {t.name: t.compute().to(t.dtype) for t in prepared.plan.tensors}
    finally:
        torch.set_num_threads(threads)
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


def test_the_read_ahead_serves_every_read(tmp_path):
    """Mixed tensor sizes (buffers reused for smaller tensors, reclaimed for larger ones): every input comes
    from the read-ahead thread, none is read by the merge itself, and nothing failed on the way."""
    from merger.execute import run_tensors
    from merger.io.writer import ShardWriter, TensorSpec

    g = torch.Generator().manual_seed(0)
    sizes = [(256, 64), (8,), (1024, 64), (64, 64), (8,), (512, 64)] * 3
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_tensors(tmp_path / name, {f"t{k}": torch.randn(s, generator=g) for k, s in enumerate(sizes)})
        (tmp_path / name / "config.json").write_text("{}")
    r = {"merge_method": "linear", "models": [{"model": str(tmp_path / n), "parameters": {"weight": 0.5}}
                                             for n in ("a", "b")]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    plan = prepare(load_recipe(tmp_path / "r.yaml")).plan
    (tmp_path / "out").mkdir()
    specs = [TensorSpec(t.name, t.shape, t.dtype) for t in plan.tensors]
    with ShardWriter(tmp_path / "out", specs) as shards:
        limit = 3 * 1024 * 64 * 4  # tight: buffers must be trimmed for the large tensors
        ahead = run_tensors(plan.tensors, shards, limit=limit, workers=2)
        shards.finish()
    assert ahead.error is None and ahead.served == 2 * len(sizes) and ahead.peak <= limit


def test_any_number_of_workers_writes_the_same_bytes(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from merger.cli import app

    m = {k: str(v) for k, v in tiny_models.items()}
    r = {"merge_method": "della", "base_model": m["base"], "parameters": {"epsilon": 0.1, "lambda": 1.1},
         "models": [{"model": m[k], "parameters": {"weight": 0.6, "density": 0.5}} for k in ("ft_a", "ft_b")]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    outs = []
    for n in (1, 2, 5):
        res = CliRunner().invoke(app, ["build", str(tmp_path / "r.yaml"), str(tmp_path / f"out{n}"), "-q",
                                       "--threads", str(n), "--random-seed", "3"])
        assert res.exit_code == 0, res.stderr
        outs.append((tmp_path / f"out{n}" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("method,dtype", [("linear", "float32"), ("ties", "float32"), ("ties", "bfloat16"),
                                          ("dare_linear", "float16")])
def test_methods_compute_into_the_output_file_and_write_the_same_bytes(method, dtype, tmp_path, tiny_models,
                                                                       monkeypatch):
    from typer.testing import CliRunner

    from merger.cli import app
    from merger.io import writer

    m = {k: str(v) for k, v in tiny_models.items()}
    r = {"merge_method": method, "models": [{"model": m[k], "parameters": {"weight": w, "density": 0.5}}
                                            for k, w in (("ft_a", 0.6), ("ft_b", 0.3))]}
    r["dtype"] = dtype
    if method != "linear":
        r["base_model"] = m["base"]
    else:
        r["models"] = [{"model": x["model"], "parameters": {"weight": x["parameters"]["weight"]}} for x in r["models"]]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    in_place = []
    real = writer.ShardWriter.wrote
    monkeypatch.setattr(writer.ShardWriter, "wrote", lambda self, name: in_place.append(name) or real(self, name))

    def build(out: str) -> bytes:
        res = CliRunner().invoke(app, ["build", str(tmp_path / "r.yaml"), str(tmp_path / out), "-q"])
        assert res.exit_code == 0, res.stderr
        return (tmp_path / out / "model.safetensors").read_bytes()

    mapped = build("mapped")
    assert len(in_place) == 4 * 9 + 3                  # every tensor of the 4-layer model went in place
    monkeypatch.setattr(writer.ShardWriter, "mapped", lambda self, name: None)
    assert build("written") == mapped


def test_a_mapped_output_lands_in_the_file_and_needs_reserved_blocks(tmp_path, monkeypatch):
    from merger.io import writer

    specs = [writer.TensorSpec("a", (3, 5), torch.float32)]
    with writer.ShardWriter(tmp_path, specs) as w:
        view = w.mapped("a")
        view.copy_(torch.arange(15.0).view(3, 5))
        w.wrote("a")
        del view
        w.finish()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["a"], torch.arange(15.0).view(3, 5))
    monkeypatch.setattr(writer, "_reserve", lambda fd, size: os.ftruncate(fd, size) or False)
    (tmp_path / "sparse").mkdir()
    with writer.ShardWriter(tmp_path / "sparse", specs) as w:
        assert w.mapped("a") is None                   # a full disk would SIGBUS a write through the mapping


class _Source:
    """A checkpoint stand-in whose reads can be held back, to watch the read-ahead's admission."""

    def __init__(self, sizes: dict[str, int]):
        import threading

        self.sizes, self.reads, self.gate = sizes, [], threading.Event()
        self.gate.set()

    def nbytes(self, name: str) -> int:
        return self.sizes[name]

    def read_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        self.gate.wait(5)
        self.reads.append(name)
        return buf[: self.sizes[name]].fill_(len(name))


def test_the_read_ahead_admits_in_order_within_the_budget():
    import time

    src = _Source({"a": 400, "b": 400, "c": 900, "d": 100})
    jobs = [([(src, n)], 100) for n in ("a", "b", "c", "d")]
    ahead = ReadAhead(jobs, limit=1000, ahead=4)
    ahead.start()
    try:
        time.sleep(0.2)
        # a (500) and b (500) fit in 1000; c (1000) must wait for both, and d, though small, waits behind c
        assert src.reads == ["a", "b"] and ahead.used == 1000
        assert ahead.claim() == 0
        ahead.begin(0)
        assert ahead.take(src, "a").tolist() == [1] * 400 and ahead.take(src, "a") is None  # then: read it
        ahead.end()
        ahead.release(0)
        time.sleep(0.2)
        assert src.reads == ["a", "b"]  # c still does not fit beside b
        ahead.release(1)
        time.sleep(0.2)
        assert src.reads == ["a", "b", "c"] and ahead.used == 1000
        ahead.release(2)
        time.sleep(0.2)
        assert src.reads == ["a", "b", "c", "d"] and ahead.peak <= 1000
        assert ahead.error is None and ahead.served == 1
    finally:
        ahead.close()
    assert not ahead.thread.is_alive()


def test_a_tensor_larger_than_the_budget_still_goes_alone():
    src = _Source({"big": 5000, "small": 10})
    ahead = ReadAhead([([(src, "big")], 5000), ([(src, "small")], 10)], limit=1000, ahead=2)
    ahead.start()
    try:
        for k in (0, 1):
            assert ahead.claim() == k
            ahead.begin(k)
            assert ahead.take(src, ("big", "small")[k]) is not None
            ahead.end()
            ahead.release(k)
        assert ahead.claim() is None and ahead.used == 0 and ahead.served == 2
    finally:
        ahead.close()


def test_the_pool_reuses_buffers_by_size_and_trims_the_largest():
    pool = BufferPool()
    small, big = torch.empty(100, dtype=torch.uint8), torch.empty(1000, dtype=torch.uint8)
    pool.give(small)
    pool.give(big)
    assert pool.idle_bytes == 1100
    assert pool.take(100).data_ptr() == small.data_ptr()  # reused, not a fresh (page-faulting) allocation
    assert pool.take(100) is None and pool.take(999) is None
    pool.give(small)
    pool.drop_largest()
    assert pool.idle_bytes == 100 and pool.take(1000) is None


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
