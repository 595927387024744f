"""Benchmark `merger build` on three synthetic ~1 GB checkpoints: wall time, peak RSS, and the
ratio of wall time to reading every input byte once (the floor, measured in the same run).

    python bench/merge.py --method ties --size-gb 1
    python bench/merge.py --vocab 64000 --repeat 3   # union vs base vocabulary: peak RSS and wall, alternating

With --vocab, the three models have embeddings of that many rows (the largest tensors) and
tokenizers that differ: ft-a adds two special tokens, ft-b has its ids shuffled; a linear merge runs
with `tokenizer_source: base` and `union` in alternating runs, and the medians are compared.

Checkpoints (a Llama-layout base and perturbed copies, float32, hidden 3072) are written once
into --workdir and reused. The merge runs as a subprocess whose own peak RSS (its rusage) is
printed beside the expected bound: startup RSS + (inputs + 1) × the largest tensor + the shard
buffer.
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
from pathlib import Path

import yaml

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 3072, 8192, 24, 8
RUN_CLI = "import sys; from merger.cli import main; sys.argv[0] = 'merger'; main()"
# Per-method parameters; the recipe adds weights and, for base methods, base_model.
METHODS: dict[str, dict] = {
    "linear": {}, "task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5}, "breadcrumbs": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.5, "epsilon": 0.1},
    "model_stock": None, "sce": None, "karcher": None, "multislerp": {}, "nuslerp": {},
    "slerp": None, "nearswap": None,
}
GLOBAL = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.001}, "sce": {"select_topk": 0.5}}


def layer_bytes() -> int:
    hd = HIDDEN // HEADS
    per = 2 * HIDDEN * HEADS * hd + 2 * HIDDEN * KV_HEADS * hd + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    return 4 * per


def make_config(size_gb: float) -> dict:
    from merger import synth

    target = int(size_gb * 1e9)
    layers = max(1, target // layer_bytes())
    # Embeddings and lm_head fill the rest, no larger than an MLP matrix.
    vocab = min(INTERMEDIATE, max(512, (target - layers * layer_bytes()) // (2 * 4 * HIDDEN)))
    return synth.llama_config(hidden=HIDDEN, intermediate=INTERMEDIATE, heads=HEADS, kv_heads=KV_HEADS,
                              layers=layers, vocab=vocab)


def make_models(root: Path, size_gb: float) -> list[Path]:
    """base, ft-a, ft-b under root (written once; a marker file says they are complete)."""
    from merger import synth

    names = ["base", "ft-a", "ft-b"]
    paths = [root / n for n in names]
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"size_gb": size_gb}:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    cfg = make_config(size_gb)
    base = synth.random_weights(cfg, seed=0)
    synth.write_checkpoint(paths[0], cfg, base)
    for k, p in enumerate(paths[1:], start=1):
        synth.write_checkpoint(p, cfg, synth.perturb(base, seed=k, scale=0.1))
    marker.write_text(json.dumps({"size_gb": size_gb}))
    return paths


def recipe(method: str, models: list[Path]) -> dict:
    base, *fts = (str(p) for p in models)
    per = METHODS[method]
    uses_base = method != "linear" and method not in ("karcher", "multislerp")
    if uses_base:
        entries = [{"model": m, "parameters": {"weight": 0.5, **per}} if per is not None else {"model": m}
                   for m in fts]
        r = {"merge_method": method, "base_model": base, "models": entries}
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


def wordlevel_tokenizer(tokens: list[str], added: list[str]) -> dict:
    """A tokenizer.json with a plain word-level vocabulary (any size, no training) and added specials."""
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": len(tokens) + k, "content": t, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for k, t in enumerate(added)],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": tokens[0]}}


def make_vocab_models(root: Path, vocab: int) -> list[Path]:
    """base, ft-a (+2 special tokens), ft-b (ids shuffled): embeddings of `vocab` rows dominate."""
    import torch

    from merger import synth
    from merger.io.hf import write_config
    from merger.io.writer import write_tensors

    names = ["base", "ft-a", "ft-b"]
    paths = [root / n for n in names]
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"vocab": vocab}:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    cfg = synth.llama_config(hidden=2048, intermediate=5632, heads=16, kv_heads=8, layers=2, vocab=vocab)
    base = synth.random_weights(cfg, seed=0)
    tokens = ["<unk>"] + [f"t{i:06d}" for i in range(1, vocab)]
    g = torch.Generator().manual_seed(5)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(vocab - 1, generator=g) + 1])
    for k, (p, name) in enumerate(zip(paths, names)):
        w = base if k == 0 else synth.perturb(base, seed=k, scale=0.1)
        c = dict(cfg)
        toks, added = list(tokens), []
        if name == "ft-a":
            added = ["<|im_start|>", "<|im_end|>"]
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                w[key] = torch.cat([w[key], torch.randn(2, w[key].shape[1], generator=g)])
            c["vocab_size"] = vocab + 2
        if name == "ft-b":
            toks = [tokens[int(i)] for i in torch.argsort(perm)]  # token at new id perm[i] is tokens[i]
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                moved = torch.empty_like(w[key])
                moved[perm] = w[key]
                w[key] = moved
        p.mkdir(parents=True)
        write_tensors(p, w)
        write_config(p, c)
        (p / "tokenizer.json").write_text(json.dumps(wordlevel_tokenizer(toks, added)))
        (p / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    marker.write_text(json.dumps({"vocab": vocab}))
    return paths


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def vocab_bench(args: argparse.Namespace) -> None:
    """Union against base vocabulary on the same linear merge: peak RSS and wall, alternating runs."""
    root = args.workdir / f"models-vocab-{args.vocab}"
    subprocess.run([sys.executable, __file__, "--make-models", "--vocab", str(args.vocab), "--workdir",
                    str(args.workdir)], check=True)
    models = [root / n for n in ("base", "ft-a", "ft-b")]
    log = args.workdir / "build.log"
    results: dict[str, list[tuple[int, float]]] = {"base": [], "union": []}
    for _ in range(args.repeat):
        for source in ("base", "union"):
            r = {"merge_method": "linear", "base_model": str(models[0]), "tokenizer_source": source, "dtype": "float32",
                 "models": [{"model": str(m), "parameters": {"weight": 1 / 3}} for m in models]}
            path = args.workdir / f"vocab-{source}.yaml"
            path.write_text(yaml.safe_dump(r, sort_keys=False))
            out = args.workdir / f"out-vocab-{source}"
            shutil.rmtree(out, ignore_errors=True)
            rc, peak_kb, wall = run_measured([sys.executable, "-c", RUN_CLI, "build", str(path), str(out), "-q"], log)
            if rc != 0:
                sys.exit(f"merger build failed: {log.read_text().strip()}")
            results[source].append((peak_kb, wall))
            shutil.rmtree(out, ignore_errors=True)
    embed = args.vocab * 2048 * 4
    print(f"machine: {os.cpu_count()} CPUs; linear merge of 3 models, embeddings {args.vocab} x 2048 float32 "
          f"({embed / 1e6:.0f} MB each, the largest tensors); {args.repeat} alternating runs, medians")
    rss = {k: median([p for p, _ in v]) / 1024 for k, v in results.items()}
    wall = {k: median([w for _, w in v]) for k, v in results.items()}
    for k in ("base", "union"):
        print(f"tokenizer_source: {k:5s}  peak RSS {rss[k]:.0f} MB  wall {wall[k]:.2f} s")
    print(f"union / base: peak RSS {rss['union'] / rss['base']:.3f}x (target <= 1.2x), wall {wall['union'] / wall['base']:.2f}x")


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
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="linear", choices=sorted(METHODS))
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each of the 3 input checkpoints")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merger-bench")
    ap.add_argument("--shard-mb", type=int, default=5000, help="merger build --out-shard-size, in MB")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the merge (OMP_NUM_THREADS); 0 = torch's default. On a shared, "
                         "oversubscribed machine 1 avoids threads stalling at every op's barrier")
    ap.add_argument("--vocab", type=int, default=0,
                    help="compare union and base vocabularies on embeddings of this many rows (e.g. 64000)")
    ap.add_argument("--repeat", type=int, default=3, help="with --vocab: alternating runs per variant")
    ap.add_argument("--make-models", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vocab:
        if args.make_models:
            make_vocab_models(args.workdir / f"models-vocab-{args.vocab}", args.vocab)
        else:
            vocab_bench(args)
        return

    root = args.workdir / f"models-{args.size_gb:g}gb"
    if args.make_models:
        make_models(root, args.size_gb)
        return
    # This process never imports torch and never holds tensors: a child forked from a big parent
    # would report the parent's pages in its peak RSS. So even the checkpoints are made in a child.
    subprocess.run([sys.executable, __file__, "--make-models", "--size-gb", str(args.size_gb),
                    "--workdir", str(args.workdir)], check=True)
    models = [root / n for n in ("base", "ft-a", "ft-b")]
    weights = sorted(f for m in models for f in m.glob("*.safetensors"))
    r = recipe(args.method, models)
    inputs = len(r["models"]) + (1 if "base_model" in r else 0)
    used = [f for f in weights if any(f.parent == Path(x) for x in
                                      [e["model"] for e in r["models"]] + [r.get("base_model", "")])]
    recipe_path = args.workdir / f"{args.method}.yaml"
    recipe_path.write_text(yaml.safe_dump(r, sort_keys=False))
    out = args.workdir / f"out-{args.method}"
    shutil.rmtree(out, ignore_errors=True)

    log = args.workdir / "build.log"
    # Startup RSS: python + torch + merger, nothing merged.
    _, startup_kb, _ = run_measured([sys.executable, "-c", "import merger.cli, merger.execute, torch"], log)
    read_floor(used)  # warm the page cache, as a merge reading a freshly written checkpoint would find it
    floor = read_floor(used)
    rc, peak_kb, wall = run_measured([sys.executable, "-c", RUN_CLI, "build", str(recipe_path), str(out), "-q",
                                      "--out-shard-size", f"{args.shard_mb}MB", "--random-seed", "1"], log,
                                     env={**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None)
    if rc != 0:
        sys.exit(f"merger build failed: {log.read_text().strip()}")

    in_bytes = sum(f.stat().st_size for f in used)
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    big = largest_tensor(used)
    shard = min(args.shard_mb * 10**6, out_bytes)
    bound = startup_kb * 1024 + (inputs + 1) * big + shard
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f}; torch threads: {args.threads or 'default'}")
    print(f"method={args.method} inputs={inputs} x {in_bytes / inputs / 1e9:.2f} GB "
          f"(largest tensor {big / 1e6:.0f} MB), output {out_bytes / 1e9:.2f} GB")
    print(f"wall {wall:.2f} s | read floor {floor:.2f} s ({in_bytes / floor / 1e9:.2f} GB/s) | "
          f"ratio {wall / floor:.1f}x")
    print(f"peak RSS {peak_kb / 1024:.0f} MB | startup {startup_kb / 1024:.0f} MB | "
          f"bound startup + (inputs+1) x largest + shard buffer = {bound / 2**20:.0f} MB")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
