"""`merger eval`'s scoring (merger's engine, strided windows through the KV cache, lm_head only on scored
positions) against transformers on the same synthetic Llama and the same token ids, scored the Hugging
Face perplexity guide's way (each window one forward with labels, the context positions masked with -100).

Both models are loaded side by side and run alternately --repeat times, so load from other processes hits
both alike; the medians count. Prints tokens scored per second, the ratio, and the two mean NLLs (they
must agree). The text is the built-in domains, tokenised by synth's tokenizer (ids < 512 are valid in the
larger vocabulary), repeated up to --tokens.
    python3 bench/eval.py                                  # hidden 1024, 8 layers, vocab 32000, 4096 tokens
    python3 bench/eval.py --window 512 --dtypes bfloat16 --repeat 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from merger import synth
from merger.engine.model import load_model
from merger.evaluate.score import LogProbs, score, stride_of
from merger.evaluate.texts import builtin_texts
from merger.io.dtypes import parse_dtype


def make_model(root: Path, a: argparse.Namespace) -> Path:
    path = root / f"llama-{a.hidden}x{a.layers}-v{a.vocab}"
    if (path / "config.json").is_file():
        return path
    cfg = synth.llama_config(hidden=a.hidden, layers=a.layers, heads=max(1, a.hidden // 64),
                             kv_heads=max(1, a.hidden // 256), intermediate=a.intermediate, vocab=a.vocab,
                             max_positions=max(4096, a.window))
    synth.write_checkpoint(path, cfg, synth.random_weights(cfg, 0), tokenizer=False)
    return path


def token_ids(n: int) -> list[int]:
    tok = synth.make_tokenizer(512)
    ids = [1]
    while len(ids) < n:
        for t in builtin_texts():
            ids += tok.encode(t.text, add_special_tokens=False).ids
    return ids[:n]


def ours_runner(path: Path, dtype: torch.dtype, ids: list[int], window: int):
    model = load_model(path, dtype)

    def run() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        s = score(ids, LogProbs(model, ids, window, cache_bytes=0))
        return time.perf_counter() - t0, s.nll, s.tokens
    return run


def hf_runner(path: Path, dtype: torch.dtype, ids: list[int], window: int):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    x = torch.tensor([ids])

    @torch.inference_mode()
    def run() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        nll_sum, n, prev = 0.0, 0, 0
        for begin in range(0, len(ids), stride_of(window)):
            end = min(begin + window, len(ids))
            trg = end - prev
            inp = x[:, begin:end]
            labels = inp.clone()
            labels[:, :-trg] = -100
            loss = model(inp, labels=labels).loss          # mean over the (shifted) unmasked labels
            k = int((labels[:, 1:] != -100).sum())
            nll_sum += float(loss) * k
            n += k
            prev = end
            if end == len(ids):
                break
        return time.perf_counter() - t0, nll_sum / n, n
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per engine; the medians count")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merger-bench-eval")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = make_model(a.workdir, a)
    ids = token_ids(a.tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores (other processes skew every figure)")
    print(f"model {path.name}: {len(ids)} tokens, window {a.window}, stride {stride_of(a.window)}")
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
        print("baseline not installed (pip install transformers): merger's figures only")
    for dname in a.dtypes.split(","):
        dtype = parse_dtype(dname)
        runners = {"merger": ours_runner(path, dtype, ids, a.window)}
        if have_hf:
            runners["transformers"] = hf_runner(path, dtype, ids, a.window)
        runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in runners}
        for _ in range(a.repeat):
            for k, run in runners.items():
                runs[k].append(run())
        tps = {k: statistics.median(n / s for s, _, n in r) for k, r in runs.items()}
        nll = {k: r[0][1] for k, r in runs.items()}
        line = f"[{dname}] tokens/s  merger {tps['merger']:8.1f}"
        if have_hf:
            line += (f"  transformers {tps['transformers']:8.1f}  ratio {tps['merger'] / tps['transformers']:.2f}x"
                     f"  (mean NLL {nll['merger']:.6f} vs {nll['transformers']:.6f})")
        print(line)


if __name__ == "__main__":
    main()
