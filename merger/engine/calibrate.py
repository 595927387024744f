"""Which matmul kernel runs where, measured once on the running CPU instead of guessed from its family.

For each weight dtype: decode (a few rows) native gemv or torch; prefill native gemm, torch, or torch's float32
GEMM over upcast weight blocks ("blocked"); and from which K the gemv reads its rows side by side rather than
one after another (cpu_dots.h `dots`). Each choice is the fastest of a short timed run on weights of a
decode-like size (~2 s in all). The result is a JSON file beside the compiled kernels, keyed by the CPU's
model name and flags, the kernel source and flags, torch's version, the instruction set torch's kernels use
(ATEN_CPU_CAPABILITY can lower it) and the thread count: any change measures
again. Under MERGER_CALIBRATE=0 nothing is measured and the defaults below hold (native where it exists).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from merger.cache import cache_dir
from merger.engine import native
from merger.engine.upcast import blocked

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NEVER = 1 << 62  # side_from: no K is read side by side
# the K at which the two gemv layouts are compared: 2^(1/3) apart from 2048 to 16384 (rounded to 32), since
# where side by side starts to pay (x and a row no longer sharing L1) falls between model widths: a 5632-wide
# fp16 down projection read one after another ran at 15 GB/s, side by side at 24 (2-core EPYC)
SIDE_KS = (512, 1024, 2048, 2592, 3264, 4096, 5152, 6496, 8192, 10336, 13024, 16384)
# side by side counts as faster at a K only when it takes at most this share of the other layout's time: near
# the crossover the two differ by a few percent, less than the machine's noise, and the choice flipped between
# runs (K >= 3264, 5152 or 8192 on one 2-core EPYC); one after another stays there
SIDE_MARGIN = 0.9
VERSION = 4  # bump when the measurements change meaning

ROUNDS = 9  # timed calls per candidate, alternating between candidates: the fastest counts

# timer(label, fn) -> seconds of one call of fn: the real one runs it, a test's returns a number per label
Timer = Callable[[tuple, Callable[[], object]], float]


def timed(label: tuple, fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fastest(label: tuple, candidates: dict[str, Callable[[], object]], timer: Timer,
            times: dict[str, float]) -> str:
    """The candidate with the shortest call, ROUNDS calls each after a warm-up, taken in turn so that load
    from other processes falls on all of them alike (it only ever adds time, so the minimum counts)."""
    if timer is timed:
        for fn in candidates.values():
            fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in candidates.items():
            best[name] = min(best[name], timer((*label, name), fn))
    times.update({" ".join(map(str, (*label[1:], name))): t for name, t in best.items()})
    return min(best, key=best.__getitem__)


def cpu_signature() -> dict[str, str]:
    """The CPU's model name and feature flags (Linux: /proc/cpuinfo), else platform's description."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or platform.machine(), "flags": ""}
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {"cpu": fields.get("model name", platform.machine()),
            "flags": " ".join(sorted(fields.get("flags", fields.get("Features", "")).split()))}


def signature() -> dict[str, object]:
    """Everything a measured choice depends on: any change invalidates the cached result."""
    lib, why = native.library()
    return {"version": VERSION, **cpu_signature(), "kernels": native.source_key(),
            "native": "on" if lib is not None else why, "torch": torch.__version__,
            "torch_cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def cache_path(sig: dict[str, object]) -> Path:
    key = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("kernels") / f"calibration-{key}.json"


def defaults() -> dict[str, dict[str, object]]:
    """What holds without measuring: the native kernels wherever they exist, torch elsewhere."""
    out: dict[str, dict[str, object]] = {}
    for name, dtype in DTYPES.items():
        have = native.gemv_kernel(dtype) is not None
        out[name] = {"decode": "native" if have else "torch", "prefill": "native" if have else "torch",
                     "side_from": native.SIDE_FROM, "slow_torch": dtype != torch.float32 and not have}
    return out


def measure(timer: Timer = timed) -> dict[str, dict[str, object]]:
    """Time the candidates for each dtype and keep the fastest (with the times, in seconds)."""
    out: dict[str, dict[str, object]] = {}
    for name, dtype in DTYPES.items():
        gemv, gemm = native.gemv_kernel(dtype), native.gemm_kernel(dtype)
        flat = torch.full(((64 << 20) // dtype.itemsize,), 0.01, dtype=dtype)  # past most last-level caches
        times: dict[str, float] = {}
        side_from = NEVER
        if gemv is not None:  # from which K side by side wins, at this and every larger measured K
            for k in reversed(SIDE_KS):
                ws, x = _weights(flat, k)
                fastest((name, "gemv", f"K={k}"), {
                    "one after another": lambda: [native.gemv(x, w, gemv, None, dtype, NEVER) for w in ws],
                    "side by side": lambda: [native.gemv(x, w, gemv, None, dtype, 0) for w in ws]}, timer, times)
                if times[f"gemv K={k} side by side"] > SIDE_MARGIN * times[f"gemv K={k} one after another"]:
                    break
                side_from = k
        ws, x = _weights(flat, 2048)
        decode = {"torch": lambda: [F.linear(x, w) for w in ws]}
        if gemv is not None:
            decode["native"] = lambda: [native.gemv(x, w, gemv, None, dtype, side_from) for w in ws]
        xp, wp = torch.randn(128, 1024).to(dtype), torch.randn(1536, 1024).to(dtype)
        prefill = {"torch": lambda: F.linear(xp, wp), "blocked": lambda: _blocked(xp, wp)}
        if gemm is not None:
            prefill["native"] = lambda: native.gemm(xp.float(), wp, gemm, None, dtype)
        out[name] = {"decode": fastest((name, "decode"), decode, timer, times),
                     "prefill": fastest((name, "prefill"), prefill, timer, times), "side_from": side_from}
        # torch's own half-precision GEMM slower than float32 over upcast blocks
        out[name]["slow_torch"] = times["prefill torch"] > times["prefill blocked"]
        out[name]["seconds"] = times
    return out


def _weights(flat: torch.Tensor, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """4 weights K wide filling the flat buffer, and one x row."""
    n = flat.numel() // (4 * k)
    return [flat[i * n * k:(i + 1) * n * k].view(n, k) for i in range(4)], torch.randn(1, k).to(flat.dtype)


def _blocked(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return blocked(x, w, None, x.dtype)


def load_or_measure(timer: Timer = timed) -> dict[str, dict[str, object]]:
    """The cached choices for this machine, else measured now and cached (a write that fails only costs a
    measurement next time)."""
    sig = signature()
    path = cache_path(sig)
    try:
        saved = json.loads(path.read_text())
        if saved.get("signature") == sig and set(saved.get("choices", {})) == set(DTYPES):
            return saved["choices"]
    except (OSError, ValueError, AttributeError):
        pass  # absent, unreadable or corrupt: measure
    choices = measure(timer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"signature": sig, "choices": choices}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return choices


@functools.cache
def choices() -> dict[str, dict[str, object]]:
    """This process's choices (measured or loaded once)."""
    if os.environ.get("MERGER_CALIBRATE", "1") == "0":
        return defaults()
    return load_or_measure()


def choice(dtype: torch.dtype, what: str):
    """One entry ("decode", "prefill", "side_from", "slow_torch") for weights of `dtype`."""
    return choices()[native.TYPE_NAMES[dtype]][what]


def describe() -> str:
    """One line per dtype for benchmarks: what was chosen."""
    parts = []
    for name, c in choices().items():
        side = "never" if c["side_from"] >= NEVER else f"K>={c['side_from']}"
        parts.append(f"{name}: decode {c['decode']}, prefill {c['prefill']}, gemv rows side by side {side}")
    return "kernel choices (calibrated): " + "; ".join(parts)
