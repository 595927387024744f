"""The engine's native CPU kernels against the torch paths they replace, on the same weights.

gemv (decode, one token): each shape is repeated until the set is far larger than the last-level cache,
so every call reads its weights from memory; prints the read rate of both (GB/s), the ratio, and a
streaming-read bandwidth measured in the same run for scale.
gemm (prefill, --tokens rows): the engine's linear with the native kernels and without them (then weight
blocks, upcast if half, go to MKL's float32 GEMM); prints GFLOP/s of both and the ratio.
    python3 bench/matmul_kernels.py
    python3 bench/matmul_kernels.py --dtypes bfloat16 --shapes 14336x4096,4096x14336 --tokens 64,512
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from generate import Roof  # bench/generate.py: the same read roof as the engine benchmark
from merger.engine import matmul, native
from merger.io.dtypes import parse_dtype


def best(fn, reps: int) -> float:
    """Seconds of the fastest of `reps` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_gemv(dtype: torch.dtype, n: int, k: int, set_bytes: float, reps: int, bw: float) -> str:
    count = max(2, int(set_bytes // (n * k * torch.finfo(dtype).bits // 8)))
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g).to(dtype) for _ in range(count)]
    x = torch.randn(1, k, generator=g).to(dtype)
    nbytes = sum(w.nbytes for w in ws)

    def each(fn):
        return lambda: [fn(w) for w in ws]

    theirs = nbytes / best(each(lambda w: F.linear(x, w)), reps)
    line = f"gemv {dtype_name(dtype):9} {n:6}x{k:<6} torch {theirs / 1e9:5.1f} GB/s"
    kernel = native.gemv_kernel(dtype)
    if kernel is not None:
        x32 = x.float()
        ours = nbytes / best(each(lambda w: native.gemv(x32, w, kernel)), reps)
        line += (f"  native {ours / 1e9:5.1f} GB/s  ratio {ours / theirs:.2f}x"
                 f"  ({100 * ours / bw:.0f}% of the read)")
    return line


def bench_gemm(dtype: torch.dtype, n: int, k: int, tokens: int, reps: int) -> str:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    flop = 2 * n * k * tokens
    kernel = matmul._native_kernel(x, w, tokens)  # None where linear would not take gemm here
    off = lambda x, w, rows: None  # noqa: E731 - the engine's torch path: no native kernel found
    real, matmul._native_kernel = matmul._native_kernel, off
    try:
        theirs = flop / best(lambda: matmul.linear(x, w), reps)
    finally:
        matmul._native_kernel = real
    line = f"gemm {dtype_name(dtype):9} {n:6}x{k:<6} {tokens:4} tokens  torch {theirs / 1e9:5.0f} GFLOP/s"
    if kernel is not None:
        ours = flop / best(lambda: matmul.linear(x, w), reps)
        line += f"  native {ours / 1e9:5.0f} GFLOP/s  ratio {ours / theirs:.2f}x"
    return line


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="11264x2048,2048x5632,3072x2048", help="NxK weight shapes")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="weight dtypes")
    ap.add_argument("--tokens", default="64,128", help="gemm rows")
    ap.add_argument("--set-bytes", type=float, default=256e6, help="gemv: bytes of distinct weights per shape")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {native.status()}")
    bw = Roof().read(5)
    print(f"streaming read (sum over 1 GiB, best of 5): {bw / 1e9:.1f} GB/s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    dtypes = [parse_dtype(d) for d in a.dtypes.split(",")]
    for dtype in dtypes:
        for n, k in shapes:
            print(bench_gemv(dtype, n, k, a.set_bytes, a.reps, bw), flush=True)
    for dtype in dtypes:
        for tokens in (int(t) for t in a.tokens.split(",")):
            for n, k in shapes:
                print(bench_gemm(dtype, n, k, tokens, a.reps), flush=True)


if __name__ == "__main__":
    main()
