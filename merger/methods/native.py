"""The merge methods' native kernels (method_kernels.c): DELLA's per-row ranking, the MT19937 stream of the
random masks, TIES' magnitude-key histograms, pass B of the task-vector family (`combine`) and a float32
linear merge. Compiled on first use like the engine's (merger.native_build) and called via ctypes, which
releases the GIL, so merge workers run them side by side. Optional: without a C compiler, or with
MERGER_NATIVE=0, every entry point returns None and its caller takes the torch path, which gives the same bits."""
from __future__ import annotations

import ctypes
import functools
import math
import platform
from pathlib import Path

import torch

from merger import native_build

SOURCE = Path(__file__).with_name("method_kernels.c")
# AVX2, FMA and F16C on x86 (library() checks the CPU): the combine, linear and histogram kernels exist only
# with FMA and F16C
FLAGS = (["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared"]
         + (["-mavx2", "-mfma", "-mf16c"] if platform.machine() == "x86_64" else []))
# dtype -> (bytes per element, bits without the sign, the key every NaN becomes: infinity's plus one)
KEYS = {torch.float32: (4, 0x7FFFFFFF, 0x7F800001), torch.bfloat16: (2, 0x7FFF, 0x7F81),
        torch.float16: (2, 0x7FFF, 0x7C01)}
_P, _L, _I, _U, _D, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_uint32, ctypes.c_double, ctypes.c_float
# per-type kernels: op -> (argument types, the types it is built for)
_TYPED = {
    # n, base, models, count, elect, normalize, total, scale_by, lambda, out
    "combine": ([_L, _P, _P, _I, _I, _I, _F, _I, _F, _P], tuple(native_build.TYPE_NAMES)),
    # n, t, base, high (-1: the high histogram), hist
    "key_hist": ([_L, _P, _P, ctypes.c_int64, _P], tuple(native_build.TYPE_NAMES)),
    # n, tensors, weights, count, out
    "linear": ([_L, _P, _P, _I, _P], (torch.float32,)),
}
MAX_MODELS = 64


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    missing = native_build.avx2_missing()  # the library is built with FMA on x86
    if missing:
        return None, missing
    lib, why = native_build.load(SOURCE.stem, [SOURCE], [], FLAGS, [])
    if lib is not None:
        lib.merger_rank_keep.argtypes, lib.merger_rank_keep.restype = [_P, _I, _L, _L, _L, _U, _U, _P, _D, _D, _P], _I
        lib.merger_mt_seed.argtypes, lib.merger_mt_seed.restype = [_P, ctypes.c_uint64], None
        lib.merger_mt_uniforms.argtypes, lib.merger_mt_uniforms.restype = [_P, _L, _P], None
        for op, (argtypes, dtypes) in _TYPED.items():
            for dtype in dtypes:
                fn = getattr(lib, f"merger_{op}_{native_build.TYPE_NAMES[dtype]}", None)
                if fn is not None:  # absent where the compiler had no FMA/F16C
                    fn.argtypes, fn.restype = argtypes, _I
    return lib, why


def _typed(op: str, dtype: torch.dtype):
    """Kernel `op` for elements of `dtype`, or None where it is not built."""
    lib, _ = library()
    if lib is None or dtype not in _TYPED[op][1]:
        return None
    return getattr(lib, f"merger_{op}_{native_build.TYPE_NAMES[dtype]}", None)


def rank_keep(values: torch.Tensor, u: torch.Tensor, scale: float, offset: float) -> torch.Tensor | None:
    """Bool [rows, width]: u < rank·scale + offset, rank being each entry's place by |value| within its row
    (ascending, ties by position, NaNs last); None when the kernel is unavailable for these tensors."""
    lib, _ = library()
    if lib is None or values.dtype not in KEYS or values.dim() != 2 or not values.is_cpu:
        return None
    rows, width = values.shape
    if values.stride(1) != 1:
        values = values.contiguous()
    u = u.to(torch.float64).contiguous()
    if u.shape != values.shape:
        raise ValueError(f"rank_keep: uniforms {tuple(u.shape)} do not match values {tuple(values.shape)}")
    size, absmask, nan_key = KEYS[values.dtype]
    keep = torch.empty((rows, width), dtype=torch.bool)
    if lib.merger_rank_keep(values.data_ptr(), size, rows, width, values.stride(0), absmask, nan_key,
                            u.data_ptr(), scale, offset, keep.data_ptr()):
        raise MemoryError(f"rank_keep: no memory for a {width}-entry row")
    return keep


class Stream:
    """The MT19937 stream of `torch.Generator().manual_seed(seed)`, read as torch.rand(dtype=float64) reads it,
    at about a fifth of torch's cost; `stream(seed)` gives None where the kernel is unavailable."""

    def __init__(self, lib: ctypes.CDLL, seed: int):
        self.lib, self.state = lib, ctypes.create_string_buffer(4 * 625)
        self.buffer = torch.empty(0, dtype=torch.float64)
        lib.merger_mt_seed(self.state, seed & 0xFFFFFFFF)

    def uniforms(self, shape) -> torch.Tensor:
        """The next draws, shaped `shape`, in a buffer reused by the next call (no fresh pages per block)."""
        n = math.prod(shape)
        if self.buffer.numel() < n:
            self.buffer = torch.empty(n, dtype=torch.float64)
        out = self.buffer[:n].view(shape)
        self.lib.merger_mt_uniforms(self.state, n, out.data_ptr())
        return out


def stream(seed: int) -> Stream | None:
    lib, _ = library()
    return None if lib is None else Stream(lib, seed)


class CombineModel(ctypes.Structure):
    """One model's input to the combine kernel: the C struct combine_model, field for field."""
    _fields_ = [("t", _P), ("kind", ctypes.c_int32), ("has_inner", ctypes.c_int32),
                ("outer_thr", ctypes.c_int64), ("outer_left", ctypes.c_int64),
                ("inner_thr", ctypes.c_int64), ("inner_left", ctypes.c_int64),
                ("u", _P), ("p", _D), ("bools", _P), ("alpha", ctypes.c_float), ("weight", ctypes.c_float),
                ("elects", ctypes.c_int32), ("positive", ctypes.c_int32)]


KINDS = {"keep": 0, "drop": 1, "cuts": 2, "uniform": 3, "bools": 4}


def combine_kernel(dtype: torch.dtype):
    """The fused pass-B kernel for blocks of `dtype`, or None: it needs a C compiler and an x86 CPU on which
    torch's own ops use FMA (AVX2 or AVX-512, which `library` checks), so that both paths round alike."""
    return _typed("combine", dtype)


def combine(kernel, out: torch.Tensor, base: torch.Tensor, tensors: list[torch.Tensor], masks: list,
            alphas: list[float], weights: list[float], elect: bool, normalize: bool, total: float,
            lam: float) -> bool:
    """out = the family's merge of one block (contiguous CPU tensors of one dtype and length); `masks` are
    sparsify.KernelMask. False, with `out` partly written and every cut's state as before, when a NaN was
    met: the caller redoes the block in torch."""
    if len(tensors) > MAX_MODELS:
        raise ValueError(f"combine: at most {MAX_MODELS} models, got {len(tensors)}")
    n = base.numel()
    for t in (out, base, *tensors):
        if t.numel() != n or not t.is_contiguous() or t.dtype != base.dtype or not t.is_cpu:
            raise ValueError("combine: blocks must be contiguous CPU tensors of one dtype and length")
    models = (CombineModel * len(tensors))()
    keep = []                                          # the arrays the structs point into
    for m, t, mask, a, w in zip(models, tensors, masks, alphas, weights):
        m.t, m.kind, m.alpha, m.weight = t.data_ptr(), KINDS[mask.kind], a, w
        m.elects, m.positive = int(w != 0), int(w > 0)
        if mask.kind == "cuts":
            outer, inner = (mask.cuts + (None,))[:2]
            m.outer_thr, m.outer_left = outer.thr, outer.left
            if inner is not None:
                m.has_inner, m.inner_thr, m.inner_left = 1, inner.thr, inner.left
        elif mask.kind == "uniform":
            u = mask.u.to(torch.float64).contiguous()
            if u.numel() != n:
                raise ValueError("combine: uniforms do not match the block")
            keep.append(u)
            m.u, m.p = u.data_ptr(), mask.p
        elif mask.kind == "bools":
            bools = mask.bools.to(torch.bool).contiguous()
            if bools.numel() != n:
                raise ValueError("combine: mask does not match the block")
            keep.append(bools)
            m.bools = bools.data_ptr()
    rc = kernel(n, base.data_ptr(), models, len(tensors), int(elect), int(normalize), total,
                int(lam != 1), lam, out.data_ptr())
    if rc == 1:
        raise ValueError("combine: the kernel refused its arguments")
    if rc == 2:
        return False
    for m, mask in zip(models, masks):
        if mask.kind == "cuts":
            mask.cuts[0].left = m.outer_left
            if len(mask.cuts) > 1:
                mask.cuts[1].left = m.inner_left
    return True


def top_cuts(t: torch.Tensor, base: torch.Tensor, ks: list[int]) -> list[tuple[int, int]] | None:
    """For each k (0 < k < numel), (thr, need) of the k largest magnitude keys of round(t - base): the k-th
    largest key, and how many keys equal to it the top k take. Two histogram passes, shared by every k;
    None when the kernel is unavailable or the delta has a NaN (the caller then counts in torch)."""
    kernel = _typed("key_hist", base.dtype)
    if (kernel is None or t.dtype != base.dtype or t.shape != base.shape or not t.is_contiguous()
            or not base.is_contiguous() or not t.is_cpu or not base.is_cpu):
        return None
    n = base.numel()
    wide = base.dtype == torch.float32
    high = torch.zeros(1 << 16 if wide else 1 << 15, dtype=torch.int64)
    if kernel(n, t.data_ptr(), base.data_ptr(), -1, high.data_ptr()):
        return None
    above_high = high.flip(0).cumsum(0).flip(0)        # above_high[v]: keys whose high part is >= v
    cuts = []
    lows: dict[int, torch.Tensor] = {}
    for k in ks:
        v = int((above_high >= k).nonzero().max())      # the bucket holding the k-th largest key
        over = int(above_high[v + 1]) if v + 1 < above_high.numel() else 0
        if not wide:
            cuts.append((v, k - over))
            continue
        if v not in lows:
            lows[v] = torch.zeros(1 << 15, dtype=torch.int64)
            kernel(n, t.data_ptr(), base.data_ptr(), v, lows[v].data_ptr())
        above_low = lows[v].flip(0).cumsum(0).flip(0) + over
        j = int((above_low >= k).nonzero().max())
        over_j = int(above_low[j + 1]) if j + 1 < above_low.numel() else over
        cuts.append(((v << 15) | j, k - over_j))
    return cuts


def linear(tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Σ wᵢ·tᵢ with the rounding of torch's `t₀ * w₀` then `add_(tᵢ, alpha=wᵢ)`, in one pass, into `out` (or a
    new tensor); None where the kernel is unavailable for these tensors (contiguous float32 CPU tensors of one
    shape: torch rounds bf16 and fp16 sums differently in a tensor's last few elements, by vector width)."""
    dtype = tensors[0].dtype
    kernel = _typed("linear", dtype)
    if kernel is None or len(tensors) > MAX_MODELS or any(t.dtype != dtype or t.shape != tensors[0].shape
                                                          or not t.is_contiguous() or not t.is_cpu for t in tensors):
        return None
    if out is None:
        out = torch.empty_like(tensors[0])
    elif out.shape != tensors[0].shape or out.dtype != dtype or not out.is_contiguous() or not out.is_cpu:
        raise ValueError("linear: out must be a contiguous CPU tensor shaped like the inputs")
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    ws = (ctypes.c_float * len(weights))(*weights)
    if kernel(out.numel(), ptrs, ws, len(tensors), out.data_ptr()):
        raise ValueError(f"linear: at most {MAX_MODELS} models")
    return out
