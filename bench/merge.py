"""Benchmark `merger build` on three synthetic float32 checkpoints against the I/O floor and, when given,
mergekit on the same recipe, in alternating runs (medians of --repeat), each build a whole process.

    python bench/merge.py --methods linear,ties --repeat 3
    python bench/merge.py --methods linear,ties --mergekit /path/to/venv/bin/mergekit-yaml

The floor, measured in the same run: reading every input byte once (into a reused buffer, page cache
warm, as a merge of freshly written checkpoints finds it) plus writing the output's bytes once with
fsync. Printed per method: wall, wall / floor, wall / linear's wall, merger / mergekit, peak RSS
against the bound (inputs + 2) x the largest tensor + 256 MB above the start-up RSS.
The default models (--preset issue17) are hidden 2048, 12 layers, vocab 32000: 2.7 GB each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median
from pathlib import Path

import yaml

RUN_CLI = "import sys; from merger.cli import main; sys.argv[0] = 'merger'; main()"
PRESETS = {
    "issue17": {"hidden": 2048, "intermediate": 5632, "heads": 16, "kv_heads": 4, "layers": 12, "vocab": 32000},
    "small": {"hidden": 1024, "intermediate": 2816, "heads": 16, "kv_heads": 4, "layers": 4, "vocab": 8000},
}
# Per-method parameters; the recipe adds weights and, for base methods, base_model.
METHODS: dict[str, dict | None] = {
    "linear": {}, "task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5}, "breadcrumbs": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.5, "epsilon": 0.1},
    "model_stock": None, "sce": None, "karcher": None, "multislerp": {}, "nuslerp": {},
    "slerp": None, "nearswap": None,
}
GLOBAL = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.001}, "sce": {"select_topk": 0.5}}


def make_models(root: Path, preset: str) -> list[Path]:
    """base, ft-a, ft-b under root (written once; a marker file says they are complete)."""
    from merger import synth

    paths = [root / n for n in ("base", "ft-a", "ft-b")]
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"preset": preset}:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    cfg = synth.llama_config(**PRESETS[preset])
    base = synth.random_weights(cfg, seed=0)
    synth.write_checkpoint(paths[0], cfg, base)
    for k, p in enumerate(paths[1:], start=1):
        synth.write_checkpoint(p, cfg, synth.perturb(base, seed=k, scale=0.1))
    marker.write_text(json.dumps({"preset": preset}))
    return paths


def recipe(method: str, models: list[Path]) -> dict:
    base, *fts = (str(p) for p in models)
    per = METHODS[method]
    uses_base = method not in ("linear", "karcher", "multislerp")
    if uses_base:
        entries = [{"model": m, "parameters": {"weight": 0.5, **per}} if per is not None else {"model": m}
                   for m in fts]
        r: dict = {"merge_method": method, "base_model": base, "models": entries}
    else:
        r = {"merge_method": method, "models": [{"model": m, "parameters": {"weight": 1 / 3}} for m in (base, *fts)]}
    if method == "karcher":
        r["models"] = [{"model": e["model"]} for e in r["models"]]
    if method in ("slerp", "nearswap"):
        r["models"] = r["models"][:1]
    if method == "nuslerp":
        r["models"] = [{"model": m, "parameters": {"weight": 0.5}} for m in fts]
    if method in GLOBAL:
        r["parameters"] = GLOBAL[method]
    r["dtype"] = "float32"
    return r


def read_floor(files: list[Path]) -> float:
    """Seconds to read every byte of `files` once into a reused buffer."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def write_floor(folder: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` once (16 MB writes from a reused buffer) and fsync, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = memoryview(os.urandom(1 << 20) * 16)
    path = folder / "floor.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[:min(left, len(buf))])
        os.fsync(fd)
    finally:
        os.close(fd)
    took = time.perf_counter() - t0
    path.unlink()
    return took


def largest_tensor(files: list[Path]) -> int:
    """Bytes of the largest tensor, from the safetensors headers (no torch in this process)."""
    best = 0
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        best = max([best] + [end - start for start, end in (v["data_offsets"] for v in header.values())])
    return best


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, int, float]:
    """Run a child; return (exit code, its own peak RSS in KB, wall seconds). os.wait4 gives that
    child's rusage alone (getrusage(RUSAGE_CHILDREN) would be the maximum over all children)."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="linear,ties", help="comma-separated merge methods (linear first)")
    ap.add_argument("--preset", default="issue17", choices=sorted(PRESETS))
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per method (and per tool)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merger-bench")
    ap.add_argument("--shard-mb", type=int, default=5000, help="merger build --out-shard-size, in MB")
    ap.add_argument("--mergekit", type=Path, help="mergekit-yaml to run on the same recipes (its own venv)")
    ap.add_argument("--extra", default="", help="extra arguments for merger build, e.g. '--threads 1'")
    ap.add_argument("--make-models", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.workdir / f"models-{args.preset}"
    if args.make_models:
        make_models(root, args.preset)
        return
    # This process never imports torch and never holds tensors: a child forked from a big parent would
    # report the parent's pages in its peak RSS. So even the checkpoints are made in a child.
    subprocess.run([sys.executable, __file__, "--make-models", "--preset", args.preset, "--workdir",
                    str(args.workdir)], check=True)
    models = [root / n for n in ("base", "ft-a", "ft-b")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.mergekit is None:
        print("mergekit: baseline not installed (pass --mergekit PATH/TO/mergekit-yaml); skipped")
    elif not args.mergekit.exists():
        print(f"mergekit: baseline not installed ({args.mergekit} not found); skipped")
        args.mergekit = None
    log = args.workdir / "build.log"
    _, startup_kb, _ = run_measured([sys.executable, "-c", "import merger.cli, merger.pipeline, torch"], log)
    runs: dict[tuple[str, str], list[tuple[int, float]]] = {}
    floors: dict[str, float] = {}
    info: dict[str, tuple[int, int, int, int]] = {}
    for rep in range(args.repeat):
        for method in methods:
            r = recipe(method, models)
            used = sorted(f for m in [r.get("base_model")] + [e["model"] for e in r["models"]] if m
                          for f in Path(m).glob("*.safetensors"))
            path = args.workdir / f"{method}.yaml"
            path.write_text(yaml.safe_dump(r, sort_keys=False))
            tools = [("merger", [sys.executable, "-c", RUN_CLI, "build", str(path), str(args.workdir / "out"), "-q",
                                 "--out-shard-size", f"{args.shard_mb}MB", *args.extra.split()])]
            if args.mergekit:
                tools.append(("mergekit", [str(args.mergekit), str(path), str(args.workdir / "out"),
                                           "--lazy-unpickle", "--copy-tokenizer"]))
            for tool, cmd in tools if rep % 2 == 0 else tools[::-1]:
                shutil.rmtree(args.workdir / "out", ignore_errors=True)
                read_floor(used)  # page cache warm, as after writing the checkpoints
                rc, peak_kb, wall = run_measured(cmd, log)
                if rc != 0:
                    sys.exit(f"{tool} build failed: {log.read_text().strip()[-2000:]}")
                runs.setdefault((method, tool), []).append((peak_kb, wall))
                if tool == "merger":
                    out_bytes = sum(f.stat().st_size for f in (args.workdir / "out").glob("*.safetensors"))
                    info[method] = (len(used), sum(f.stat().st_size for f in used), out_bytes, largest_tensor(used))
            shutil.rmtree(args.workdir / "out", ignore_errors=True)
            n_in, in_bytes, out_bytes, _ = info[method]
            floor = read_floor(used) + write_floor(args.workdir / "floor", out_bytes)
            floors.setdefault(method, 0.0)
            floors[method] += floor / args.repeat
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; preset {args.preset}; "
          f"{args.repeat} alternating runs, medians; build args: {args.extra or '(none)'}")
    lin = median([w for _, w in runs[(methods[0], "merger")]])
    for method in methods:
        n_in, in_bytes, out_bytes, big = info[method]
        wall = median([w for _, w in runs[(method, "merger")]])
        peak = median([p for p, _ in runs[(method, "merger")]]) * 1024
        bound = startup_kb * 1024 + (n_in + 2) * big + 256 * 2**20
        line = (f"{method:16s} {n_in} x {in_bytes / n_in / 1e9:.2f} GB -> {out_bytes / 1e9:.2f} GB | wall {wall:6.2f} s"
                f" | floor {floors[method]:.2f} s ({wall / floors[method]:.2f}x) | vs {methods[0]} {wall / lin:.2f}x"
                f" | peak RSS {peak / 2**20:.0f} MB (bound {bound / 2**20:.0f} MB)")
        if (method, "mergekit") in runs:
            mk = median([w for _, w in runs[(method, "mergekit")]])
            mk_peak = median([p for p, _ in runs[(method, "mergekit")]]) * 1024
            line += f" | mergekit {mk:.2f} s, {mk_peak / 2**20:.0f} MB: merger {mk / wall:.2f}x faster"
        print(line)


if __name__ == "__main__":
    main()
