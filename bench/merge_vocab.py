"""Benchmark a union vocabulary against `tokenizer_source: base` on the same linear merge: peak RSS and
wall time, in alternating runs (medians). The three models have embeddings of --vocab rows (the
largest tensors) and tokenizers that differ: ft-a adds two special tokens, ft-b has its ids shuffled.

    python bench/merge_vocab.py --vocab 64000 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from merge import RUN_CLI, median, run_measured  # noqa: E402

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


def vocab_bench(args: argparse.Namespace) -> None:
    """Union against base vocabulary on the same linear merge: peak RSS and wall, alternating runs."""
    root = args.workdir / f"models-vocab-{args.vocab}"
    subprocess.run([sys.executable, __file__, "--make-models", "--vocab", str(args.vocab), "--workdir",
                    str(args.workdir)], check=True)  # torch stays out of this process (its RSS would count)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=64000, help="embedding rows of the three models")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per variant")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merger-bench")
    ap.add_argument("--make-models", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_models:
        make_vocab_models(args.workdir / f"models-vocab-{args.vocab}", args.vocab)
    else:
        vocab_bench(args)


if __name__ == "__main__":
    main()
