"""The merge methods' native kernels (method_kernels.c) against the torch path they replace: the same bits
for every method of the task-vector family, every input dtype, negative and zero weights, λ, normalize, masks
whose ties cross tile and block edges, and NaN/inf inputs (where the kernel hands the block back to torch);
the histogram thresholds against find_cut, the MT19937 stream against torch.rand. The torch path itself is
checked against float64 references in test_methods_task_arithmetic.py and test_methods_sparsify.py."""
from __future__ import annotations

import itertools

import pytest
import torch

from merger import plugins
from merger.methods import native, sparsify
from merger.methods.base import MergeContext

FAMILY = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear"]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture
def kernel(monkeypatch):
    """The combine kernel loaded even under MERGER_NATIVE=0 (that keeps builds off it, not its tests); a skip
    only where it cannot exist (no compiler, or a CPU without AVX2)."""
    monkeypatch.setenv("MERGER_NATIVE", "1")
    native.library.cache_clear()
    if native.combine_kernel(torch.float32) is None:
        pytest.skip(f"no combine kernel here: {native.library()[1]}")
    yield
    native.library.cache_clear()


def both_paths(name, tensors, base, params, model_params, seed, monkeypatch):
    """(the torch path's result, the native kernels' result) of one merge."""
    cls = plugins.methods()[name]
    ctx = lambda: MergeContext(name="w", generator=torch.Generator().manual_seed(seed), dtype=base.dtype)  # noqa: E731
    fused = cls().merge(tensors, base, params, model_params, ctx())
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: (None, "off for this test"))
        plain = cls().merge(tensors, base, params, model_params, ctx())
    return plain, fused


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def extra(name: str) -> dict:
    return {"epsilon": 0.1} if name.startswith("della") else {"gamma": 0.05} if "breadcrumbs" in name else {}


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_kernel_gives_the_torch_paths_bits(name, dtype, kernel, monkeypatch):
    g = torch.Generator().manual_seed(len(name))
    shape = (37, 129)                                   # 4773 elements: tiles of 256 and a ragged tail
    base = torch.randn(shape, generator=g).to(dtype)
    cls = plugins.methods()[name]
    for ws, lam, normalize, density in itertools.product(((0.5, 0.3), (0.7, -0.2, 0.0)), (1.0, 0.8),
                                                         (False, True), (0.4, 1.0)):
        tensors = [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in ws]
        tensors[0].view(-1)[::5] = base.view(-1)[::5]   # zero deltas: -0 and +0 products, no vote
        tensors[1].view(-1)[::3] = (base.float().view(-1)[::3] + 0.25).to(dtype)  # equal magnitudes: cut ties
        params = cls.Params(**{"lambda": lam, "normalize": normalize})
        mps = [cls.ModelParams(weight=w, density=density, **extra(name)) for w in ws]
        plain, fused = both_paths(name, tensors, base, params, mps, 4, monkeypatch)
        assert same_bits(plain, fused), (ws, lam, normalize, density)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_combine_kernel_across_blocks_and_with_nan(name, kernel, monkeypatch):
    monkeypatch.setattr(sparsify, "BLOCK", 640)          # 5 rows a block: cut ties cross blocks and tiles
    g = torch.Generator().manual_seed(9)
    base = torch.randn(60, 128, generator=g)
    tensors = [base + (0.2 * torch.randn(60, 128, generator=g)).mul(8).round().div(8) for _ in range(3)]
    tensors[0][7, 3] = float("nan")                      # its block goes back to torch
    tensors[1][40, 0] = float("inf")
    cls = plugins.methods()[name]
    mps = [cls.ModelParams(weight=w, density=0.4, **extra(name)) for w in (0.6, 0.3, 0.8)]
    plain, fused = both_paths(name, tensors, base, cls.Params(), mps, 2, monkeypatch)
    assert same_bits(plain, fused) and fused[7, 3].isnan()   # (inf · a dropped 0 is NaN too, as in torch)


def test_combine_refuses_blocks_that_do_not_fit(kernel):
    k = native.combine_kernel(torch.float32)
    a, b = torch.zeros(8), torch.zeros(9)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype and length"):
        native.combine(k, torch.empty(8), a, [b], [sparsify.KernelMask("keep")], [1.0], [1.0], False, False, 1.0, 1.0)
    with pytest.raises(ValueError, match="uniforms do not match"):
        native.combine(k, torch.empty(8), a, [a], [sparsify.KernelMask("uniform", u=torch.zeros(3), p=0.5)],
                       [1.0], [1.0], False, False, 1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_cuts_equal_find_cut(dtype, kernel):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 77, generator=g).to(dtype)
    t = (base.float() + (0.1 * torch.randn(300, 77, generator=g)).mul(64).round().div(64)).to(dtype)  # many ties
    t.view(-1)[::11] = base.view(-1)[::11]
    d = t - base
    n = d.numel()
    rows = sparsify.rows_of(d)
    blocks = lambda: (sparsify.keys_of(rows[sl]) for sl in sparsify.row_blocks(rows))  # noqa: E731
    ks = [1, 2, 17, n // 3, n // 2, n - n // 11, n - 1]
    got = native.top_cuts(t, base, ks)
    for k, (thr, need) in zip(ks, got):
        want = sparsify.find_cut(blocks, sparsify.keys_of(sparsify.strided_sample(d)), n, k)
        assert (thr, need) == (want.thr, want.need), k
    t.view(-1)[5] = float("nan")
    assert native.top_cuts(t, base, ks) is None          # NaN keys: the torch path counts them


def test_stream_is_torch_rand_float64(kernel):
    for seed in (0, 5, 2**40 + 3):
        g = torch.Generator().manual_seed(seed)
        s = native.stream(seed)
        for k in (1, 311, 312, 313, 1, 623, 624, 1000, 5):   # draws straddling the generator's 624-word twists
            assert torch.equal(s.uniforms((k,)), torch.rand(k, dtype=torch.float64, generator=g))


def test_linear_kernel_gives_torchs_bits(kernel):
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 255, 256, 257, 100_003):
        for ws in ((0.3, 0.5, 0.2), (1.0,), (0.7, -0.4), (0.1,) * 5):
            ts = [torch.randn(n, generator=g) for _ in ws]
            want = ts[0] * ws[0]
            for w, t in zip(ws[1:], ts[1:]):
                want.add_(t, alpha=w)
            out = torch.full((n,), float("nan"))
            assert native.linear(ts, list(ws), out) is out and same_bits(out, want), (n, ws)
    assert native.linear([torch.zeros(4, dtype=torch.bfloat16)], [1.0]) is None   # torch's own bf16 rounding
    with pytest.raises(ValueError, match="out must be"):
        native.linear([torch.zeros(4)], [1.0], torch.zeros(5))
