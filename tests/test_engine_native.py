"""The native CPU kernels (merger/engine/cpu_kernels.c): gemv and gemm against float64 math for every shape,
stride and tile edge they accept, RMSNorm and one-query attention against torch's own, and the fallbacks
when they cannot be built. A bf16 model with them and without: test_engine.py."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from merger.engine import native
from merger.engine.matmul import BLOCKED_MIN_ROWS, linear, slow_half

BUILDABLE = (shutil.which("cc") or shutil.which("gcc")) is not None and \
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """A clean build state: its own cache folder, the per-process memo cleared before and after."""
    monkeypatch.setenv("MERGER_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def _usable(op: str, dtype: torch.dtype):
    """The kernel `linear` would take for this dtype, or a skip saying why there is none here."""
    kernel = getattr(native, f"{op}_kernel")(dtype)
    if kernel is None or (dtype != torch.float32 and not slow_half(dtype, torch.device("cpu"))):
        pytest.skip(native.status())
    return kernel


def test_kernels_are_built_where_a_compiler_and_avx2_exist(fresh_native, tmp_path):
    if not BUILDABLE:
        pytest.skip("no C compiler or no AVX2 here")
    for dtype in DTYPES:
        assert native.gemv_kernel(dtype) is not None, native.status()
        assert native.gemm_kernel(dtype) is not None
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


def _check(x, w, b, ref):
    out = linear(x, w, b, out_dtype=torch.float32)
    assert out.shape == ref.shape and out.is_contiguous()
    assert_close(out.double(), ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=1e-5)
    # in the model dtype: one rounding of the float32 result
    assert_close(linear(x, w, b), out.to(x.dtype), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("n,k", [(37, 29), (130, 1000), (9, 8), (4, 2055)])
def test_gemv_equals_float64_math(dtype, rows, n, k):
    kernel = _usable("gemv", dtype)
    x, w, b, ref = _case(dtype, rows, n, k)
    _check(x, w, b, ref)
    # float32 input with half weights and the other way round (the kernel widens x itself)
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    xo = x.to(other)
    out = native.gemv(xo, w, kernel, b, out_dtype=torch.float32)
    assert_close(out.double(), xo.double() @ w.double().t() + b.double(),
                 atol=1e-4 * (1 + ref.abs().max().item()), rtol=1e-5)
    if dtype == torch.float32 and rows == 1:  # x itself a strided view: its rows are made contiguous first
        xs = torch.randn(k, 2, generator=torch.Generator().manual_seed(k))[:, 0]
        assert_close(linear(xs, w).double(), w.double() @ xs.double(), atol=1e-4 * k ** 0.5, rtol=1e-5)


# rows around the 16-token tile and the 256-token chunk, n around the 6-row strip and the 8-strip block
# (130: a block and a part on each of 2 threads), k around the 256-wide slice and the 8-wide load
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [BLOCKED_MIN_ROWS, 16, 17, 45, 300])
@pytest.mark.parametrize("n,k", [(1, 3), (5, 256), (6, 257), (37, 29), (130, 700)])
def test_gemm_equals_float64_math(dtype, rows, n, k):
    _usable("gemm", dtype)
    _check(*_case(dtype, rows, n, k))


def test_gemm_with_float32_weights_and_a_batch_dimension():
    """The float32 gemm called directly (on AVX-512 machines linear leaves float32 prefill to MKL); the bf16
    one through a [B, T, K] input, as the model calls it."""
    kernel = _usable("gemm", torch.float32)
    x, w, b, ref = _case(torch.float32, 33, 70, 300)
    out = native.gemm(x, w, kernel, b)
    assert out.shape == (33, 70) and out.dtype == torch.float32
    assert_close(out.double(), ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=1e-5)
    x, w, b, ref = _case(torch.bfloat16, 24, 50, 300)
    out = linear(x.view(2, 12, 300), w, b, out_dtype=torch.float32)
    assert_close(out.view(24, 50).double(), ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_rounds_inf_and_nan_as_torch_does(dtype):
    """gemm rounds its float32 sums to the model dtype itself: overflow, inf and NaN must come out as torch's."""
    _usable("gemm", dtype)
    x, w, b, _ = _case(dtype, 20, 13, 40)
    x[3, 5], x[7, :] = float("inf"), float("nan")
    x[11] *= 3e4  # past fp16's range: the float32 sums round to inf there
    out32 = linear(x, w, b, out_dtype=torch.float32)
    assert out32[7].isnan().all() and not out32[0].isnan().any()
    assert_close(linear(x, w, b), out32.to(dtype), atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 37), (2, 20, 130), (1, 7)])
def test_rmsnorm_equals_torch(dtype, shape):
    """Float32 math; in half precision two roundings (normalised row, then times the weight), as transformers."""
    kernel = native.rmsnorm_kernel(dtype)
    if kernel is None:
        pytest.skip(native.status())
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


@pytest.mark.parametrize("bsz,heads,kv_heads,keys,dim", [(1, 16, 4, 300, 128), (2, 8, 8, 1, 64), (1, 6, 2, 37, 20),
                                                          (3, 4, 1, 2000, 8)])
def test_one_query_attention_equals_sdpa(bsz, heads, kv_heads, keys, dim):
    """Keys and values as the KV cache hands them over: views of a longer buffer, query heads grouped."""
    kernel = native.attend_kernel(torch.float32)
    if kernel is None:
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(keys)
    cache_k, cache_v = (torch.randn(bsz, kv_heads, keys + 9, dim, generator=g) * 2 for _ in range(2))
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]
    q = torch.randn(bsz, dim, heads, generator=g).transpose(1, 2)  # not contiguous, as the model's q
    out = native.attend(q, k, v, dim ** -0.5, kernel)
    ref = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=dim ** -0.5, enable_gqa=True)[:, :, 0]
    assert out.shape == (bsz, heads, dim)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        native.attend(q, k, v.contiguous(), dim ** -0.5, kernel)  # strides that differ from k's
    assert native.attend_kernel(torch.bfloat16) is None  # a half-precision cache stays on SDPA


def test_empty_inner_dimension_gives_zeros_or_bias():
    for rows in (1, 20):
        for dtype in (torch.bfloat16, torch.float32):
            x, w, b = torch.empty(rows, 0, dtype=dtype), torch.empty(6, 0, dtype=dtype), torch.ones(6, dtype=dtype)
            assert torch.equal(linear(x, w, b, out_dtype=torch.float32), torch.ones(rows, 6))


def test_mismatched_shapes_never_reach_the_kernels():
    w = torch.randn(8, 16).bfloat16()
    for rows in (1, 20):
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            linear(torch.randn(rows, 12).bfloat16(), w)
    for op in ("gemv", "gemm"):
        kernel = getattr(native, f"{op}_kernel")(torch.bfloat16)
        if kernel is not None:
            run = getattr(native, op)
            with pytest.raises(ValueError, match="do not fit"):
                run(torch.randn(1, 12), w, kernel)
            with pytest.raises(ValueError, match="do not fit"):  # the kernel of another weight dtype
                run(torch.randn(2, 16), w.float(), kernel)
            with pytest.raises(ValueError, match="does not fit 8 outputs"):
                run(torch.randn(2, 16), w, kernel, bias=torch.zeros(7))
            with pytest.raises(ValueError, match="do not fit"):
                run(torch.randn(2, 16), w, kernel, out_dtype=torch.float64)
    kernel = native.gemm_kernel(torch.bfloat16)
    if kernel is not None:
        with pytest.raises(ValueError, match="do not fit"):
            native.gemm(torch.randn(20, 16).bfloat16(), w, kernel)  # gemm's x must be float32


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("MERGER_NATIVE", "0")
    assert native.gemv_kernel(torch.bfloat16) is None and native.gemm_kernel(torch.bfloat16) is None
    assert native.rmsnorm_kernel(torch.float32) is None and native.attend_kernel(torch.float32) is None
    assert native.status() == "native CPU kernels: off (disabled by MERGER_NATIVE=0)"


def test_failed_build_falls_back_to_torch(fresh_native, monkeypatch, tmp_path):
    if not BUILDABLE:
        pytest.skip("no C compiler or no AVX2 here")
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert native.gemv_kernel(torch.bfloat16) is None
    assert "compiling cpu_kernels.c failed: cc: fatal error: no input" in native.status()
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-written left behind
    for rows in (1, 20):
        x, w = torch.randn(rows, 64).bfloat16(), torch.randn(32, 64).bfloat16()
        ref = (x.double() @ w.double().t()).float()
        # torch's single-token path rounds to bf16 before the float32 cast
        assert_close(linear(x, w, out_dtype=torch.float32), ref, atol=1e-4, rtol=2 ** -8)
