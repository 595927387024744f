"""Nothing lost, nothing half-written: OUT_DIR may never be an input, the working folder or a parent of
either; builds into one folder cannot both win; a build killed at any moment leaves no output or the
previous complete one; temp folders of dead builds are cleaned up by the next build."""
from __future__ import annotations

import fcntl
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merger import synth
from merger.cli import app
from merger.io import output

from cli_checks import assert_one_line_error

runner = CliRunner()
SLOW_PLUGIN = '''
import os, time
from merger import hookimpl
from merger.methods.passthrough import Passthrough

class SlowCopy(Passthrough):
    """passthrough that takes a while per tensor and says when the first tensor is being computed"""
    name = "slow_copy"

    def merge(self, tensors, base, params, model_params, ctx):
        marker = os.environ.get("SLOW_MARKER")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0.01")))
        return super().merge(tensors, base, params, model_params, ctx)

@hookimpl
def merger_register_methods(register):
    register(SlowCopy)
'''


@pytest.fixture
def demo(tmp_path, tiny_models, monkeypatch):
    """A working folder like `merger demo`'s: models/ with inputs, a recipe beside them; cwd is it."""
    root = tmp_path / "work"
    (root / "models").mkdir(parents=True)
    for name in ("base", "ft_a", "ft_b"):
        os.symlink(tiny_models[name], root / "models" / name)  # the real inputs, reached through models/
    r = {"merge_method": "ties", "base_model": "models/base",
         "models": [{"model": "models/ft_a", "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": "models/ft_b", "parameters": {"weight": 0.5, "density": 0.5}}]}
    (root / "ties.yaml").write_text(yaml.safe_dump(r))
    monkeypatch.chdir(root)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out, needle", [
    (".", "is the working folder"),
    ("..", "is the working folder"),
    ("models", "is or holds input model"),
    ("models/ft_a", "is or holds input model"),
    ("models/ft_a/merged", "is inside input model"),
])
def test_output_never_replaces_inputs_or_the_working_folder(demo, tiny_models, out, needle):
    before = {name: snapshot(tiny_models[name]) for name in ("base", "ft_a", "ft_b")}
    listing = sorted(p.name for p in demo.iterdir())
    res = runner.invoke(app, ["build", "ties.yaml", out, "--force", "-q"])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
    assert sorted(p.name for p in demo.iterdir()) == listing
    assert {name: snapshot(tiny_models[name]) for name in before} == before


def test_output_never_holds_the_recipe(tmp_path, tiny_models):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # looks like an output, so only the recipe rule can save it
    r = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1}}]}
    (folder / "r.yaml").write_text(yaml.safe_dump(r))
    res = runner.invoke(app, ["build", str(folder / "r.yaml"), str(folder), "--force", "-q"])
    assert res.exit_code == 1 and "holds the recipe" in res.stderr, res.stderr
    assert (folder / "r.yaml").is_file()


def test_output_may_not_be_a_link(demo, tmp_path):
    os.symlink(demo / "models" / "ft_a", demo / "link")
    res = runner.invoke(app, ["build", "ties.yaml", "link", "--force", "-q"])
    assert res.exit_code == 1 and "is or holds input model 'models/ft_a'" in res.stderr, res.stderr
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", demo / "link2")
    res = runner.invoke(app, ["build", "ties.yaml", "link2", "--force", "-q"])
    assert res.exit_code == 1 and "symbolic link" in res.stderr, res.stderr


def test_stale_temp_folders_of_dead_builds_are_removed(demo):
    dead = demo / ".out.merger-tmp-dead1234"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    res = runner.invoke(app, ["build", "ties.yaml", "out", "-q"])
    assert res.exit_code == 0, res.stderr
    assert not dead.exists() and (demo / "out" / "model.safetensors").is_file()
    assert not [p for p in demo.iterdir() if "merger-" in p.name]


def test_a_live_build_into_the_same_folder_is_refused(demo):
    live = demo / ".out.merger-tmp-live5678"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running build holds on its temp folder
    try:
        code, err, out = _build(demo, "out")
        assert code == 1 and err.count("\n") == 1 and "another merger build is writing out" in err, err
        assert live.is_dir() and not out.exists()
        assert [p.name for p in demo.iterdir() if "merger-" in p.name] == [live.name]
    finally:
        os.close(fd)


def _build(root: Path, out: str, *extra: str) -> tuple[int, str, Path]:
    res = runner.invoke(app, ["build", "ties.yaml", out, "-q", *extra])
    return res.exit_code, res.stderr, root / out


def test_an_output_created_meanwhile_is_not_replaced(demo, monkeypatch):
    """The existence check is repeated under the lock at publish time, not only at the start."""
    from merger import execute

    real = execute.write_plan

    def write_then_someone_else_publishes(plan, dst, *args, **kwargs):
        files = real(plan, dst, *args, **kwargs)
        (demo / "out").mkdir()
        (demo / "out" / "theirs.txt").write_text("theirs")
        return files

    monkeypatch.setattr("merger.pipeline.write_plan", write_then_someone_else_publishes)
    code, err, out = _build(demo, "out")
    assert code == 1 and "created by someone else" in err and (out / "theirs.txt").read_text() == "theirs", err
    assert not [p for p in demo.iterdir() if "merger-tmp" in p.name]


def test_replace_keeps_the_old_output_until_the_new_one_is_in_place(demo, monkeypatch):
    """Without an atomic exchange the old output is parked; a crash between the two renames leaves it
    parked, and the next build puts it back instead of losing it."""
    assert _build(demo, "out")[0] == 0
    old = snapshot(demo / "out")
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def crash_after_first(src, dst):
        calls.append((src, dst))
        real_rename(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the process dies between the two renames

    monkeypatch.setattr(output.os, "rename", crash_after_first)
    res = runner.invoke(app, ["build", "ties.yaml", "out", "-q", "--force", "--random-seed", "3"])
    assert res.exit_code == 1 and not (demo / "out").exists()
    parked = [p for p in demo.iterdir() if ".merger-old-" in p.name]
    assert len(parked) == 1 and snapshot(parked[0]) == old
    monkeypatch.setattr(output.os, "rename", real_rename)
    code, err, _ = _build(demo, "out")  # no --force: the parked output comes back and is kept
    assert code == 1 and "put back" in err, err
    assert snapshot(demo / "out") == old and not [p for p in demo.iterdir() if "merger-" in p.name]


def test_replace_is_an_atomic_exchange_on_linux(demo, monkeypatch):
    assert _build(demo, "out")[0] == 0
    swaps = []
    real = output._exchange
    monkeypatch.setattr(output, "_exchange", lambda a, b: swaps.append((a, b)) or real(a, b))
    assert _build(demo, "out", "--force", "--random-seed", "3")[0] == 0
    assert len(swaps) == 1 and (demo / "out" / "model.safetensors").is_file()
    assert not [p for p in demo.iterdir() if "merger-" in p.name]


# --- whole processes: kill -9 at many moments, and two builds racing ------------------------------

def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    code = "import sys; from merger.cli import main; sys.argv[0] = 'merger'; main()"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


@pytest.fixture
def slow(tmp_path, tiny_models):
    """Two recipes (different outputs) whose builds take ~0.5 s of tensor work each (a slow copy plugin)."""
    (tmp_path / "slow.py").write_text(SLOW_PLUGIN)
    for name, scale in (("a", 1.0), ("b", 2.0)):
        r = {"merge_method": "slow_copy", "plugins": ["slow.py"],
             "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"scale": scale}}]}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
    return tmp_path / "a.yaml", tmp_path / "b.yaml"


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_the_old_output_or_the_new_one(tmp_path, slow):
    out = tmp_path / "o"
    complete = []
    for k, recipe in enumerate(slow):  # the complete outputs, built under the same name (the card's title)
        ref = _cli("build", str(recipe), str(tmp_path / f"ref{k}" / "o"), "-q")
        assert ref.wait(60) == 0, ref.stderr.read()
        complete.append(snapshot(tmp_path / f"ref{k}" / "o"))
    assert complete[0] != complete[1]
    rng = random.Random(0)
    marker = tmp_path / "started"
    state = None  # None: no output yet; else the index of the complete output in place
    for k in range(8):
        marker.unlink(missing_ok=True)
        new = k % 2
        force = ("--force",) if out.exists() else ()
        p = _cli("build", str(slow[new]), str(out), "-q", *force, env={"SLOW_MARKER": str(marker)})
        deadline = time.time() + 60
        while not marker.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.7))  # somewhere in the writing, the publishing, or after
        p.kill()
        p.wait()
        if not out.exists():
            assert state is None, "a killed build lost the previous output"
            continue
        got = snapshot(out)
        assert got in (complete[new], *(() if state is None else (complete[state],))), sorted(got)
        state = complete.index(got)
    final = _cli("build", str(slow[0]), str(out), "-q", "--force")  # cleans whatever the killed builds left
    assert final.wait(60) == 0, final.stderr.read()
    assert snapshot(out) == complete[0]
    assert not [p for p in tmp_path.iterdir() if "merger-" in p.name]


@pytest.mark.slow
def test_two_builds_into_one_new_folder_cannot_both_win(tmp_path, slow):
    out = tmp_path / "o"
    # ~1 s of tensor work even on two workers: the second start-up lands inside the first build
    procs = [_cli("build", str(slow[0]), str(out), "-q", env={"SLOW_SECONDS": "0.05"}) for _ in range(2)]
    codes = [p.wait(120) for p in procs]
    errs = [p.stderr.read().decode() for p in procs]
    assert sorted(codes) == [0, 1], errs
    loser = errs[codes.index(1)]
    assert loser.count("\n") == 1 and ("another merger build is writing" in loser
                                       or "created by someone else" in loser), loser
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if "merger-" in p.name]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_models):
    """A real write failure (the file-size limit stands in for a full disk) while the shards are written."""
    import resource
    import signal

    r = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 1}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    code = "import sys; from merger.cli import main; sys.argv[0] = 'merger'; main()"
    res = subprocess.run([sys.executable, "-c", code, "build", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"],
                         capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert_one_line_error(res.returncode, res.stderr, tmp_path / "out", "no space left for the output")


def test_synth_models_are_unchanged_by_a_failed_build(tmp_path):
    """The inputs of a failed build are byte-for-byte what they were (nothing is written into them)."""
    synth.make_llama(tmp_path / "a", seed=1)
    before = snapshot(tmp_path / "a")
    r = {"merge_method": "linear", "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert runner.invoke(app, ["build", str(tmp_path / "r.yaml"), str(tmp_path / "a"), "--force", "-q"]).exit_code == 1
    assert snapshot(tmp_path / "a") == before
