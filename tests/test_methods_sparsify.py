"""Sparsification masks against numpy recomputations (stable sorts), their statistics, and the
L1 rescale; plus the chunked reductions against float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from merger.methods import reduce, sparsify


def np_top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Reference: the k largest, equal values to the lower index first (a stable sort of −v)."""
    flat = values.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 200_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_top_k_mask_matches_stable_sort(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype).abs()
    ref_vals = x.double().numpy()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        got = sparsify.top_k_mask(x, k)
        assert got.dtype == torch.bool and int(got.sum()) == k
        np.testing.assert_array_equal(got.numpy(), np_top_k(ref_vals, k))


def test_top_k_mask_with_ties_in_magnitude():
    # Many exact ties (a coarse grid) and signs mixed: the count stays exact, lower index wins ties.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (50, 40), generator=g).float()
    for k in (1, 17, 500, 1111, 1999):
        got = sparsify.top_k_mask(x.abs(), k)
        np.testing.assert_array_equal(got.numpy(), np_top_k(x.abs().numpy(), k))
    const = torch.full((1000,), 0.25)
    np.testing.assert_array_equal(sparsify.top_k_mask(const, 300).numpy(), np.arange(1000) < 300)


def test_top_k_exact_when_the_strided_sample_misleads():
    # Large values sit exactly on the sample's stride, so the sample overestimates the threshold;
    # the counting passes must notice and still return the exact top-k.
    n = 1 << 20
    x = torch.arange(n, dtype=torch.float32) / n
    x[:: n // (1 << 16)] += 10.0
    for k in (1, 1 << 14, 1 << 16, (1 << 16) + 5, n // 2):
        got = sparsify.top_k_mask(x, k)
        np.testing.assert_array_equal(got.numpy(), np_top_k(x.double().numpy(), k))


def test_top_k_over_blocks_keeps_tie_order_across_blocks():
    # Rows wider than one block and ties spread over several blocks: the first `need` ties win.
    x = torch.zeros(3 * sparsify.BLOCK + 17)
    x[::3] = 1.0
    for k in (5, sparsify.BLOCK // 3 + 2, int((x > 0).sum()) + 4):
        np.testing.assert_array_equal(sparsify.top_k_mask(x, k).numpy(), np_top_k(x.numpy(), k))


@pytest.mark.parametrize("density,n,want", [(0.0, 10, 0), (1.0, 10, 10), (0.5, 10, 5), (0.05, 10, 1),
                                            (0.29, 100, 28), (1e-9, 3, 1), (0.999, 10, 9)])
def test_keep_count(density, n, want):
    assert sparsify.keep_count(density, n) == want


def test_magnitude_mask_keeps_largest_fraction():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(64, 48, generator=g)
    m = sparsify.magnitude_mask(d, 0.3)
    np.testing.assert_array_equal(m.numpy(), np_top_k(d.abs().numpy(), int(0.3 * d.numel())))
    assert sparsify.magnitude_mask(d, 1.0) is None
    assert not sparsify.magnitude_mask(d, 0.0).any()


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.1, 0.6])
def test_outlier_mask_drops_top_gamma_then_bottom(gamma):
    g = torch.Generator().manual_seed(3)
    d = torch.randn(30, 50, generator=g)
    n, density = d.numel(), 0.5
    m = sparsify.outlier_mask(d, density, gamma).numpy().reshape(-1)
    # Reference: ranks in descending |d|; keep ranks [n_top, n_top + keep).
    keep = int(density * n)
    n_top = min(int(gamma * n), n - keep)
    order = np.argsort(-np.abs(d.numpy().reshape(-1)), kind="stable")
    want = np.zeros(n, dtype=bool)
    want[order[n_top:n_top + keep]] = True
    np.testing.assert_array_equal(m, want)
    assert m.sum() == keep


def test_outlier_mask_tiny_tensor_keeps_its_largest_values():
    # gamma·numel < 1 drops no outlier, so the top values survive (they would not if a slice [n_bot:-0] were used).
    d = torch.tensor([0.1, -3.0, 0.5, 2.0])
    m = sparsify.outlier_mask(d, 0.5, 0.01)
    assert m.tolist() == [False, True, False, True]
    # density below 1/numel still keeps one entry
    assert int(sparsify.outlier_mask(d, 0.1, 0.01).sum()) == 1


def test_random_plan_statistics_and_seeding():
    d = torch.ones(400, 500)
    m1 = sparsify.materialize(sparsify.RandomKeep(0.3, 5), d)
    m2 = sparsify.materialize(sparsify.RandomKeep(0.3, 5), d)
    m3 = sparsify.materialize(sparsify.RandomKeep(0.3, 6), d)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.3) < 0.005  # ~5σ for n = 2e5
    plan = sparsify.RandomKeep(0.3, 5)
    assert torch.equal(sparsify.materialize(plan, d), sparsify.materialize(plan, d))  # restart replays


def test_rank_sampling_probability_follows_rank():
    # 6000 rows, each a random permutation of magnitudes 1..11: the rank of every entry is known.
    rows, width, density, eps = 6000, 11, 0.5, 0.3
    g = torch.Generator().manual_seed(7)
    perm = torch.argsort(torch.rand(rows, width, generator=g), dim=1)
    signs = torch.where(torch.rand(rows, width, generator=g) < 0.5, -1.0, 1.0)
    d = (perm + 1).float() * signs
    m = sparsify.materialize(sparsify.RankKeep(density, eps, 8, rows=rows), d)
    for r in range(width):
        freq = m[perm == r].float().mean().item()
        want = density - eps + 2 * eps * r / (width - 1)
        assert abs(freq - want) < 0.03, (r, freq, want)  # σ ≈ 0.0065
    assert torch.equal(m, sparsify.materialize(sparsify.RankKeep(density, eps, 8, rows=rows), d))
    plan = sparsify.RankKeep(density, eps, 8, rows=rows)
    first = sparsify.materialize(plan, d).clone()
    assert torch.equal(first, m) and torch.equal(sparsify.materialize(plan, d), m)  # a second pass replays
    # A one-element row keeps with probability density.
    one = sparsify.materialize(sparsify.RankKeep(0.4, 0.2, 9, rows=40_000), torch.ones(40_000, 1))
    assert abs(one.float().mean().item() - 0.4) < 0.015


def test_l1_rescale():
    assert sparsify.l1_rescale(10.0, 4.0) == 2.5
    assert sparsify.l1_rescale(10.0, 0.0) == 1.0
    assert sparsify.l1_rescale(0.0, 0.0) == 1.0


def test_reductions_match_float64():
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(3_000_001, generator=g), torch.randn(3_000_001, generator=g)
    ad, bd = a.double(), b.double()
    assert reduce.dot(a, b) == pytest.approx(float(ad @ bd), rel=1e-6, abs=1e-2)
    assert reduce.norm(a) == pytest.approx(float(ad.norm()), rel=1e-6)
    assert reduce.l1_norm(a) == pytest.approx(float(ad.abs().sum()), rel=1e-6)
    h = a.bfloat16()
    assert reduce.l1_norm(h) == pytest.approx(float(h.double().abs().sum()), rel=1e-6)
    assert_close(torch.tensor(reduce.dot(h, h)), h.double().square().sum().float(), rtol=1e-5, atol=0)


def np_uniforms(seed: int, shape) -> np.ndarray:
    """Reference stream: MT19937 seeded with the seed's low 32 bits (numpy's legacy seeding is the standard
    init_genrand), two words per draw, (first << 32 | second) mod 2^53 times 2^-53."""
    bits = np.random.MT19937(0)
    bits._legacy_seeding(seed & 0xFFFFFFFF)
    n = int(np.prod(shape))
    words = bits.random_raw(2 * n).astype(np.uint64)
    joined = (words[0::2] << np.uint64(32)) | words[1::2]
    return ((joined & np.uint64((1 << 53) - 1)).astype(np.float64) * 2.0 ** -53).reshape(shape)


def test_random_keep_is_the_same_stream_on_every_cpu(mask_kernels):
    # Not torch's bernoulli_, whose stream is MKL's on Intel CPUs and MT19937 elsewhere.
    d = torch.ones(300, 170)
    for seed in (5, 2**40 + 17):
        m = sparsify.materialize(sparsify.RandomKeep(0.3, seed), d)
        assert np.array_equal(m.numpy(), np_uniforms(seed, d.shape) < 0.3)


def rank_inputs(dtype: torch.dtype, rows: int = 40, width: int = 301) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * width)
    x = (torch.randn(rows, width, generator=g) * 0.01).to(dtype)
    x.view(-1)[::7] = x.view(-1)[::7].mul(50).round().div(50)   # many equal magnitudes, zeros and -0
    x[0, :3] = torch.tensor([0.0, -0.0, 0.0])
    if dtype != torch.float64:
        x[1, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"), 1.0, -1.0])
    return x


def np_rank_keep(x: torch.Tensor, u: np.ndarray, density: float, eps: float) -> np.ndarray:
    mag = np.abs(x.double().numpy())                      # NaN sorts last in numpy, equal ones in order
    order = np.argsort(mag, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(x.shape[1])[None, :].repeat(x.shape[0], 0), axis=1)
    prob = ranks.astype(np.float64) * (2 * eps / (x.shape[1] - 1)) + (density - eps)
    return u < prob


@pytest.fixture(params=["native", "torch"])
def mask_kernels(request, monkeypatch):
    """The masks' draws and ranks by the native kernels (skipped only where they cannot be built) and by torch."""
    from merger.methods import native

    library = native.library                      # the memoised loader itself
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: (None, "off for this test"))
    else:
        monkeypatch.setenv("MERGER_NATIVE", "1")
        library.cache_clear()
        if library()[0] is None:
            pytest.skip(library()[1])
    yield request.param
    library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rank_keep_matches_a_stable_sort_reference(dtype, mask_kernels):
    x = rank_inputs(dtype)
    got = sparsify.materialize(sparsify.RankKeep(0.5, 0.3, 77, rows=x.shape[0]), x)
    assert np.array_equal(got.numpy(), np_rank_keep(x, np_uniforms(77, x.shape), 0.5, 0.3))


def test_row_ranks_matches_a_stable_sort_reference():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = rank_inputs(dtype, rows=9, width=1000)
        want = np.argsort(np.argsort(np.abs(x.double().numpy()), axis=1, kind="stable"), axis=1, kind="stable")
        assert np.array_equal(sparsify.row_ranks(x).numpy(), want)
