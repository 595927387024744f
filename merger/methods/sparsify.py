"""Sparsification masks for task vectors: magnitude top-k (TIES, arXiv:2306.01708), random drop
(DARE, arXiv:2311.03099), outlier-trimmed magnitude (Model Breadcrumbs, arXiv:2312.06795) and
rank-based sampling (DELLA, arXiv:2406.11617), plus the L1-preserving rescale.

Every mask is a bool tensor (or None for "keep everything"); magnitude selection finds an exact
threshold by bisection on the float bit patterns, so it never sorts or indexes a whole tensor.
"""
from __future__ import annotations

import torch

# Non-negative IEEE floats order exactly like their bit patterns read as signed integers.
_KEY_DTYPE = {torch.float32: torch.int32, torch.float64: torch.int64,
              torch.float16: torch.int16, torch.bfloat16: torch.int16}
# Below this many candidates the bisection hands over to kthvalue on the (small) candidate set.
_SMALL_BAND = 1 << 16
# Della ranks rows in blocks of about this many elements to bound the argsort's int64 temporaries.
_DELLA_BLOCK = 1 << 22


def keep_count(density: float, n: int) -> int:
    """How many of n elements a density keeps: int(density·n), but at least one when density > 0,
    so tiny tensors (norms, biases) never lose their whole delta to rounding."""
    if density <= 0 or n == 0:
        return 0
    if density >= 1:
        return n
    return min(n, max(1, int(density * n)))


def _keys(magnitude: torch.Tensor) -> torch.Tensor:
    mag = magnitude.reshape(-1)
    if mag.dtype not in _KEY_DTYPE:
        mag = mag.float()
    return mag.view(_KEY_DTYPE[mag.dtype])


def kth_largest_key(keys: torch.Tensor, k: int) -> int:
    """The k-th largest of a flat integer tensor (1 <= k <= numel), by bisection on counts.

    Each step needs one comparison pass and a bool temporary; once few candidates remain between
    the bounds they are gathered and finished with kthvalue."""
    n = keys.numel()
    lo, c_lo = int(keys.min()), n            # count(keys >= lo) = n >= k
    hi, c_hi = int(keys.max()) + 1, 0        # count(keys >= hi) = 0 < k
    while hi - lo > 1:
        if c_lo - c_hi <= _SMALL_BAND:
            band = keys[(keys >= lo) & (keys < hi)]
            need = k - c_hi                   # rank of the answer inside the band, from the top
            return int(torch.kthvalue(band, band.numel() - need + 1).values)
        mid = (lo + hi) // 2
        c = int(torch.count_nonzero(keys >= mid))
        if c >= k:
            lo, c_lo = mid, c
        else:
            hi, c_hi = mid, c
    return lo


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly the k largest entries; equal values go to the lower flat index first."""
    n = magnitude.numel()
    if k <= 0:
        return torch.zeros(magnitude.shape, dtype=torch.bool)
    if k >= n:
        return torch.ones(magnitude.shape, dtype=torch.bool)
    keys = _keys(magnitude)
    thr = kth_largest_key(keys, k)
    mask = keys > thr
    need = k - int(torch.count_nonzero(mask))
    ties = keys == thr
    if int(torch.count_nonzero(ties)) > need:
        # Keep only the first `need` tied entries so the count is exact and the choice reproducible.
        rank = ties.cumsum(0, dtype=torch.int32 if n < 2**31 else torch.int64)
        ties &= rank <= need
    mask |= ties
    return mask.view(magnitude.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """TIES trim: keep the top `density` fraction of |delta|."""
    if density >= 1:
        return None
    return top_k_mask(delta.abs(), keep_count(density, delta.numel()))


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor | None:
    """DARE drop: keep each element independently with probability `density`."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    return torch.empty(delta.shape, dtype=torch.bool).bernoulli_(density, generator=generator)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Breadcrumbs: drop the largest `gamma` fraction and then the smallest values, keeping
    `density` overall. When gamma·numel < 1 no large value is dropped (the top-k survives)."""
    if density >= 1:
        return None
    n = delta.numel()
    keep = keep_count(density, n)
    n_top = min(int(gamma * n), n - keep)     # fewer outliers dropped if density leaves no room
    mag = delta.abs()
    mask = top_k_mask(mag, n_top + keep)
    if n_top > 0:
        mask &= ~top_k_mask(mag, n_top)
    return mask


def rank_sampling_mask(delta: torch.Tensor, density: float, epsilon: float,
                       generator: torch.Generator) -> torch.Tensor | None:
    """DELLA MagPrune: per row, rank |delta| ascending, map ranks linearly onto
    [density − ε, density + ε] and keep each element with that probability.

    Rows are the last dimension of a 2-D view (1-D tensors are one row); a one-element row keeps
    with probability `density`."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n_rows, width = rows.shape
    mask = torch.empty(rows.shape, dtype=torch.bool)
    step = 2 * epsilon / (width - 1) if width > 1 else 0.0
    low = density - epsilon if width > 1 else density
    per_block = max(1, _DELLA_BLOCK // max(width, 1))
    for r0 in range(0, n_rows, per_block):
        block = rows[r0:r0 + per_block].abs()
        order = torch.argsort(block, dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(width).expand_as(order))
        prob = ranks.to(torch.float64).mul_(step).add_(low)
        mask[r0:r0 + per_block] = torch.rand(prob.shape, generator=generator, dtype=torch.float64) < prob
    return mask.view(delta.shape)


def l1_rescale(l1_before: float, l1_after: float) -> float:
    """Factor giving the masked delta the L1 norm of the full one: `rescale` is not 1/density.
    1 when either norm is ~0 (nothing kept, or nothing to keep)."""
    if l1_before < 1e-12 or l1_after < 1e-12:
        return 1.0
    return l1_before / l1_after
