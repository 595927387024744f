"""The engine's native decode kernel against torch's own single-token matmul, on the same weights.

Each shape is repeated until the set is ~8x the last-level cache, so every call reads its weights from
memory, as in decode. Prints the read rate of both (GB/s), the ratio, and a streaming-read bandwidth
measured in the same run for scale.
    python3 bench/gemv.py
    python3 bench/gemv.py --dtypes bfloat16 --shapes 14336x4096,4096x14336
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from merger.engine import native
from merger.io.dtypes import parse_dtype


def rate(weights: list[torch.Tensor], fn, reps: int) -> float:
    """Weight bytes read per second over the whole set, best of `reps` passes."""
    fn(weights[0])
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, time.perf_counter() - t)
    return sum(w.nbytes for w in weights) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="11264x2048,2048x5632,3072x2048,32000x2048", help="NxK weight shapes")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--set-bytes", type=float, default=256e6, help="bytes of distinct weights per shape")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {native.status()}")
    buf = torch.ones(2**28)
    bw = max(2**30 / t for t in (_time(buf.sum) for _ in range(3)))
    del buf
    print(f"streaming read (sum over 1 GiB): {bw / 1e9:.1f} GB/s")
    for dname in a.dtypes.split(","):
        dtype = parse_dtype(dname)
        kernel = native.gemv_kernel(dtype)
        for shape in a.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            count = max(2, int(a.set_bytes // (n * k * torch.finfo(dtype).bits // 8)))
            g = torch.Generator().manual_seed(0)
            ws = [torch.randn(n, k, generator=g).to(dtype) for _ in range(count)]
            x = torch.randn(1, k, generator=g).to(dtype)
            theirs = rate(ws, lambda w: F.linear(x, w), a.reps)
            line = f"{dname:9} {n:6}x{k:<6} torch {theirs / 1e9:5.1f} GB/s"
            if kernel is not None:
                x32 = x.float()
                ours = rate(ws, lambda w: native.gemv(x32, w, kernel), a.reps)
                line += f"  native {ours / 1e9:5.1f} GB/s  ratio {ours / theirs:.2f}x  ({100 * ours / bw:.0f}% of the read)"
            print(line, flush=True)
            del ws


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
