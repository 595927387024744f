"""The native CPU kernels (merger/engine/cpu_*.c), called directly: gemv and gemm against float64 math for
every shape, stride and tile edge they accept, RMSNorm and one-query attention against torch's own, and the
fallbacks when they cannot be built. They run wherever the library builds (x86-64 Linux, a C compiler, AVX2),
whichever kernel the dispatcher would pick on this machine. `linear` itself is tested with tolerances that hold
on every path it may take (native, oneDNN half precision, blocked float32, F.linear). A bf16 model with the
kernels and without: test_engine.py."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from merger.engine import calibrate, native
from merger.engine.matmul import BLOCKED_MIN_ROWS, linear

BUILDABLE = (shutil.which("cc") or shutil.which("gcc")) is not None and \
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """A clean build state: its own cache folder, the per-process memo cleared before and after."""
    monkeypatch.setenv("MERGER_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    calibrate.choices.cache_clear()
    yield
    native._library.cache_clear()
    calibrate.choices.cache_clear()


@pytest.fixture
def lib(monkeypatch):
    """The kernel library, loaded even under MERGER_NATIVE=0 (that keeps the engine off it, not its tests);
    a skip, saying why, only where it cannot be built."""
    forced = os.environ.get("MERGER_NATIVE", "1") == "0"
    if forced:
        monkeypatch.setenv("MERGER_NATIVE", "1")
        native._library.cache_clear()
    try:
        if native._library()[0] is None:
            pytest.skip(native.status())
        yield
    finally:
        if forced:
            native._library.cache_clear()


@pytest.fixture(params=["dispatched", "torch only"])
def kernels(request, monkeypatch):
    """`linear` as the dispatcher runs it on this machine, and with every native kernel off."""
    if request.param == "torch only":
        monkeypatch.setattr(native, "_kernel", lambda op, dtype: None)
    return request.param


def test_kernels_are_built_where_a_compiler_and_avx2_exist(fresh_native, tmp_path, monkeypatch):
    if not BUILDABLE:
        pytest.skip("no C compiler or no AVX2 here")
    monkeypatch.setenv("MERGER_NATIVE", "1")
    for dtype in DTYPES:
        assert native.gemv_kernel(dtype) is not None, native.status()
        assert native.gemm_kernel(dtype) is not None
        assert native.rmsnorm_kernel(dtype) is not None
        assert native.attend_kernel(dtype) is not None and native.step_kernel(dtype) is not None
    assert native.gemv_kernel(torch.int8) is None
    assert list((tmp_path / "cache" / "kernels").glob("cpu_kernels-*.so"))
    assert native.status().startswith("native CPU kernels: on")


def _case(dtype: torch.dtype, rows: int, n: int, k: int):
    """x [rows, k]; a weight view [n, k] with a row stride wider than its width and a storage offset
    (like w13[e][:, a:b]); a bias; and the exact float64 result of the rounded inputs."""
    g = torch.Generator().manual_seed(rows * 100003 + n * k)
    x = torch.randn(rows, k, generator=g).to(dtype)
    big = torch.randn(3, n, k + 13, generator=g).to(dtype)
    w, b = big[1, :, 5:5 + k], torch.randn(n, generator=g).to(dtype)
    return x, w, b, x.double() @ w.double().t() + b.double()


def _float32_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Summed in float32 (in any order), rounded once to float32."""
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.is_contiguous()
    assert_close(out.double(), ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("n,k", [(37, 29), (130, 1000), (9, 8), (4, 2055)])
@pytest.mark.parametrize("side_from", [0, calibrate.NEVER], ids=["side by side", "one after another"])
def test_gemv_equals_float64_math(lib, dtype, rows, n, k, side_from):
    """Both ways of walking the weight rows, whichever calibrate.py picks on this machine."""
    kernel = native.gemv_kernel(dtype)
    x, w, b, ref = _case(dtype, rows, n, k)
    out = native.gemv(x, w, kernel, b, torch.float32, side_from)
    _float32_close(out, ref)
    # in the model dtype: one rounding of the float32 result
    assert_close(native.gemv(x, w, kernel, b, dtype, side_from), out.to(dtype), atol=0, rtol=0)
    assert_close(native.gemv(x, w, kernel, None, torch.float32, side_from), out - b.float(), atol=1e-5, rtol=1e-5)
    # float32 input with half weights and the other way round (the kernel widens x itself)
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    xo = x.to(other)
    _float32_close(native.gemv(xo, w, kernel, b, torch.float32, side_from),
                   xo.double() @ w.double().t() + b.double())


# rows around the 16-token tile and the 256-token chunk, n around the 6-row strip and the 8-strip block
# (130: a block and a part on each of 2 threads), k around the 256-wide slice and the 8-wide load
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, BLOCKED_MIN_ROWS, 16, 17, 45, 300])
@pytest.mark.parametrize("n,k", [(1, 3), (5, 256), (6, 257), (37, 29), (130, 700)])
def test_gemm_equals_float64_math(lib, dtype, rows, n, k):
    kernel = native.gemm_kernel(dtype)
    x, w, b, ref = _case(dtype, rows, n, k)
    out = native.gemm(x.float(), w, kernel, b, out_dtype=torch.float32)
    _float32_close(out, ref)
    assert_close(native.gemm(x.float(), w, kernel, b, out_dtype=dtype), out.to(dtype), atol=0, rtol=0)


def test_gemm_reads_a_strided_x_and_writes_every_output_dtype(lib):
    kernel = native.gemm_kernel(torch.bfloat16)
    x, w, b, ref = _case(torch.bfloat16, 33, 70, 300)
    wide = torch.zeros(33, 310)
    wide[:, 4:304] = x.float()  # rows 310 apart: gemm takes x's row stride as given
    out = native.gemm(wide[:, 4:304], w, kernel, b)
    _float32_close(out, ref)
    for dtype in (torch.float16, torch.bfloat16):
        assert_close(native.gemm(wide[:, 4:304], w, kernel, b, out_dtype=dtype), out.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_and_gemv_round_inf_and_nan_as_torch_does(lib, dtype):
    """The kernels round their float32 sums to the model dtype themselves: overflow, inf and NaN must come out
    as torch's own float32 -> dtype conversion makes them."""
    x, w, b, _ = _case(dtype, 20, 13, 40)
    x[3, 5], x[7, :] = float("inf"), float("nan")
    x[11] *= 3e4  # past fp16's range: the float32 sums round to inf there
    gemm = native.gemm_kernel(dtype)
    out32 = native.gemm(x.float(), w, gemm, b, out_dtype=torch.float32)
    assert out32[7].isnan().all() and not out32[0].isnan().any()
    assert_close(native.gemm(x.float(), w, gemm, b, out_dtype=dtype), out32.to(dtype), atol=0, rtol=0, equal_nan=True)
    gemv = native.gemv_kernel(dtype)
    for rows in (slice(3, 4), slice(7, 8), slice(11, 12)):
        one32 = native.gemv(x[rows], w, gemv, b, out_dtype=torch.float32)
        assert_close(native.gemv(x[rows], w, gemv, b, out_dtype=dtype), one32.to(dtype), atol=0, rtol=0,
                     equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 37), (2, 20, 130), (1, 7)])
def test_rmsnorm_equals_torch(lib, dtype, shape):
    """Float32 math; in half precision two roundings (normalised row, then times the weight), as transformers."""
    kernel = native.rmsnorm_kernel(dtype)
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    ref = F.rms_norm(x, w.shape, w, 1e-5) if dtype == torch.float32 else \
        w * F.rms_norm(x.float(), w.shape, None, 1e-5).to(dtype)
    out = native.rmsnorm(x, w, 1e-5, kernel)
    assert out.shape == x.shape and out.dtype == dtype
    # the sum of squares in another order may move a value by one float32 ulp, which can flip a rounding
    assert_close(out, ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        native.rmsnorm(x, w[:-1], 1e-5, kernel)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,heads,kv_heads,keys,dim", [(1, 16, 4, 300, 128), (2, 8, 8, 1, 64), (1, 6, 2, 37, 20),
                                                          (3, 4, 1, 2000, 8), (1, 9, 3, 129, 64)])
def test_one_query_attention_equals_float64_math(lib, dtype, bsz, heads, kv_heads, keys, dim):
    """Keys and values as the KV cache hands them over, in its dtype (bf16 and fp16 read as stored): views of a
    longer buffer, query heads grouped, more keys than one 128-key block."""
    kernel = native.attend_kernel(dtype)
    g = torch.Generator().manual_seed(keys)
    cache_k, cache_v = ((torch.randn(bsz, kv_heads, keys + 9, dim, generator=g) * 2).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]
    q = torch.randn(bsz, dim, heads, generator=g).transpose(1, 2)  # not contiguous, as the model's q
    out = native.attend(q, k, v, dim ** -0.5, kernel)
    kd, vd = (t.double().repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    p = torch.softmax(torch.einsum("bhd,bhsd->bhs", q.double(), kd) * dim ** -0.5, dim=-1)
    ref = torch.einsum("bhs,bhsd->bhd", p, vd)
    assert out.shape == (bsz, heads, dim) and out.dtype == torch.float32
    assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="do not fit"):
        native.attend(q, k, v.contiguous(), dim ** -0.5, kernel)  # strides that differ from k's
    with pytest.raises(ValueError, match="do not fit"):  # the kernel of another cache dtype
        native.attend(q, k, v, dim ** -0.5, native.attend_kernel(torch.float32 if dtype != torch.float32
                                                                  else torch.bfloat16))


def test_empty_inner_dimension_gives_the_bias(lib):
    for dtype in (torch.bfloat16, torch.float32):
        w, b = torch.empty(6, 0, dtype=dtype), torch.ones(6, dtype=dtype)
        assert torch.equal(native.gemv(torch.empty(3, 0, dtype=dtype), w, native.gemv_kernel(dtype), b),
                           torch.ones(3, 6))
        assert torch.equal(native.gemm(torch.empty(20, 0), w, native.gemm_kernel(dtype), b), torch.ones(20, 6))


def test_mismatched_shapes_never_reach_the_kernels(lib):
    w = torch.randn(8, 16).bfloat16()
    for op in ("gemv", "gemm"):
        kernel = getattr(native, f"{op}_kernel")(torch.bfloat16)
        run = getattr(native, op)
        with pytest.raises(ValueError, match="do not fit"):
            run(torch.randn(1, 12), w, kernel)
        with pytest.raises(ValueError, match="do not fit"):  # the kernel of another weight dtype
            run(torch.randn(2, 16), w.float(), kernel)
        with pytest.raises(ValueError, match="does not fit 8 outputs"):
            run(torch.randn(2, 16), w, kernel, bias=torch.zeros(7))
        with pytest.raises(ValueError, match="do not fit"):
            run(torch.randn(2, 16), w, kernel, out_dtype=torch.float64)
        with pytest.raises(ValueError, match="do not fit"):  # a column stride other than 1
            run(torch.randn(16, 2)[:, :1].t().expand(2, 16), w, kernel)
    with pytest.raises(ValueError, match="do not fit"):
        native.gemm(torch.randn(20, 16).bfloat16(), w, native.gemm_kernel(torch.bfloat16))  # gemm's x: float32


# --- `linear`, on whichever path this machine gives it ---------------------------------------------------

def _within_rounding(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Within float32 summation error plus one rounding to `dtype` (a half-precision torch path may round its
    result to the model dtype before any float32 cast): holds for every path linear may take."""
    assert_close(out.double(), ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, BLOCKED_MIN_ROWS - 1, BLOCKED_MIN_ROWS, 17, 300])
@pytest.mark.parametrize("n,k", [(37, 29), (130, 700), (4, 2055)])
def test_linear_equals_float64_math_on_every_path(kernels, dtype, rows, n, k):
    x, w, b, ref = _case(dtype, rows, n, k)
    out32 = linear(x, w, b, out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and out32.shape == (rows, n) and out32.is_contiguous()
    _within_rounding(out32, ref, dtype)
    out = linear(x, w, b)
    assert out.dtype == dtype and out.shape == (rows, n)
    _within_rounding(out, ref, dtype)
    # whatever the path, the model-dtype result is the float32 one rounded once (or the same rounded value)
    assert_close(out, out32.to(dtype), atol=0, rtol=0)


def test_linear_takes_a_batch_dimension_and_a_strided_vector(kernels):
    x, w, b, ref = _case(torch.bfloat16, 24, 50, 300)
    out = linear(x.view(2, 12, 300), w, b, out_dtype=torch.float32)
    assert out.shape == (2, 12, 50)
    _within_rounding(out.view(24, 50), ref, torch.bfloat16)
    x, w, b, ref = _case(torch.float32, 33, 70, 300)
    _within_rounding(linear(x.view(3, 11, 300), w, b).view(33, 70), ref, torch.float32)
    xs = torch.randn(300, 2, generator=torch.Generator().manual_seed(3))[:, 0]  # one row, column stride 2
    _within_rounding(linear(xs, w), w.double() @ xs.double(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_rounds_inf_and_nan_as_torch_does(kernels, dtype):
    x, w, b, _ = _case(dtype, 20, 13, 40)
    x[3, 5], x[7, :] = float("inf"), float("nan")
    out32 = linear(x, w, b, out_dtype=torch.float32)
    assert out32[7].isnan().all() and not out32[0].isnan().any() and out32[3].isinf().any()
    assert_close(linear(x, w, b), out32.to(dtype), atol=0, rtol=0, equal_nan=True)


def test_linear_with_an_empty_inner_dimension_gives_zeros_or_bias(kernels):
    for rows in (1, 20):
        for dtype in (torch.bfloat16, torch.float32):
            x, w, b = torch.empty(rows, 0, dtype=dtype), torch.empty(6, 0, dtype=dtype), torch.ones(6, dtype=dtype)
            assert torch.equal(linear(x, w, b, out_dtype=torch.float32), torch.ones(rows, 6))
            assert torch.equal(linear(x, w), torch.zeros(rows, 6, dtype=dtype))


def test_linear_refuses_mismatched_shapes_as_torch_does(kernels):
    w = torch.randn(8, 16).bfloat16()
    for rows in (1, 20):
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            linear(torch.randn(rows, 12).bfloat16(), w)


# --- build and fallback -------------------------------------------------------------------------------------

def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("MERGER_NATIVE", "0")
    assert native.gemv_kernel(torch.bfloat16) is None and native.gemm_kernel(torch.bfloat16) is None
    assert native.rmsnorm_kernel(torch.float32) is None and native.attend_kernel(torch.float32) is None
    assert native.step_kernel(torch.bfloat16) is None
    assert native.status() == "native CPU kernels: off (disabled by MERGER_NATIVE=0)"


def test_failed_build_falls_back_to_torch(fresh_native, monkeypatch, tmp_path):
    if not BUILDABLE:
        pytest.skip("no C compiler or no AVX2 here")
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("MERGER_NATIVE", "1")
    assert native.gemv_kernel(torch.bfloat16) is None
    assert "compiling cpu_kernels failed: cc: fatal error: no input" in native.status()
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-written left behind
    for rows in (1, 20):
        x, w = torch.randn(rows, 64).bfloat16(), torch.randn(32, 64).bfloat16()
        _within_rounding(linear(x, w, out_dtype=torch.float32), x.double() @ w.double().t(), torch.bfloat16)
