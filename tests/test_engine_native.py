"""The native half-precision GEMV (merger/engine/gemv.c): float64 math for every shape and stride it
accepts, and the fallbacks when it cannot be built. A bf16 model with it and without: test_engine.py."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.testing import assert_close

from merger.engine import native
from merger.engine.matmul import linear, slow_half

BUILDABLE = (shutil.which("cc") or shutil.which("gcc")) is not None and \
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """A clean build state: its own cache folder, the per-process memo cleared before and after."""
    monkeypatch.setenv("MERGER_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def test_kernel_is_built_where_a_compiler_and_avx2_exist(fresh_native, tmp_path):
    if not BUILDABLE:
        pytest.skip("no C compiler or no AVX2 here")
    assert native.gemv_kernel(torch.bfloat16) is not None, native.status()
    assert native.gemv_kernel(torch.float16) is not None
    assert native.gemv_kernel(torch.float32) is not None
    assert native.gemv_kernel(torch.int8) is None
    assert list((tmp_path / "cache" / "kernels").glob("gemv-*.so"))
    assert native.status().startswith("native gemv kernel: on")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("n,k", [(37, 29), (130, 1000), (9, 8), (4, 2055)])
def test_kernel_equals_float64_math(dtype, rows, n, k):
    kernel = native.gemv_kernel(dtype)
    if kernel is None or (dtype != torch.float32 and not slow_half(dtype, torch.device("cpu"))):
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(n * k + rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    # a weight view with a row stride wider than its width and a storage offset, like w13[e][:, a:b]
    big = torch.randn(3, n, k + 13, generator=g).to(dtype)
    w, b = big[1, :, 5:5 + k], torch.randn(n, generator=g).to(dtype)
    ref = x.double() @ w.double().t() + b.double()       # exact products of the rounded inputs
    out = linear(x, w, b, out_dtype=torch.float32)
    assert_close(out.double(), ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=1e-5)
    # in the model dtype: one rounding of the float32 result
    assert_close(linear(x, w, b), out.to(dtype), atol=0, rtol=0)
    if dtype == torch.float32 and rows == 1:  # x itself a strided view: its rows are made contiguous first
        xs = torch.randn(k, 2, generator=g)[:, 0]
        assert_close(linear(xs, w).double(), w.double() @ xs.double(), atol=1e-4 * k ** 0.5, rtol=1e-5)


def test_mismatched_shapes_never_reach_the_kernel():
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linear(torch.randn(1, 12).bfloat16(), w)
    kernel = native.gemv_kernel(torch.bfloat16)
    if kernel is not None:
        with pytest.raises(ValueError, match="do not fit"):
            native.gemv(torch.randn(1, 12), w, kernel)


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("MERGER_NATIVE", "0")
    assert native.gemv_kernel(torch.bfloat16) is None
    assert native.status() == "native gemv kernel: off (disabled by MERGER_NATIVE=0)"


def test_failed_build_falls_back_to_torch(fresh_native, monkeypatch, tmp_path):
    if not BUILDABLE:
        pytest.skip("no C compiler or no AVX2 here")
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert native.gemv_kernel(torch.bfloat16) is None
    assert "compiling gemv.c failed: cc: fatal error: no input" in native.status()
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-written left behind
    x, w = torch.randn(1, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    ref = (x.double() @ w.double().t()).float()
    assert_close(linear(x, w, out_dtype=torch.float32), ref, atol=1e-4, rtol=2 ** -8)  # torch rounds to bf16

