"""Sparsification masks for task vectors: magnitude top-k (TIES, arXiv:2306.01708), random drop
(DARE, arXiv:2311.03099), outlier-trimmed magnitude (Model Breadcrumbs, arXiv:2312.06795) and
rank-based sampling (DELLA, arXiv:2406.11617), plus the L1-preserving rescale.

A mask is produced block by block (row blocks of a 2-D view, in order) by a MaskPlan, so a merge
never holds a whole mask or delta. Magnitude plans find an exact threshold by counting, never by
sorting or indexing a whole tensor; random plans own a generator seeded from the merge's one.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from merger.methods import native

# Non-negative IEEE floats order exactly like their bit patterns read as signed integers.
_KEY_DTYPE = {torch.float32: torch.int32, torch.float64: torch.int64,
              torch.float16: torch.int16, torch.bfloat16: torch.int16}
BLOCK = 1 << 20          # elements per block: temporaries stay a few MB
_SAMPLE = 1 << 16        # strided sample that brackets the threshold before any full pass


def keep_count(density: float, n: int) -> int:
    """How many of n elements a density keeps: int(density·n), but at least one when density > 0,
    so tiny tensors (norms, biases) never lose their whole delta to rounding."""
    if density <= 0 or n == 0:
        return 0
    if density >= 1:
        return n
    return min(n, max(1, int(density * n)))


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """The 2-D view masks work on: rows are the first dim (a 1-D tensor is one row)."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def row_blocks(rows: torch.Tensor) -> list[slice]:
    per = max(1, BLOCK // max(rows.shape[1], 1))
    return [slice(r, r + per) for r in range(0, rows.shape[0], per)]


def keys_of(values: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered like |values|."""
    mag = values.abs()
    if mag.dtype not in _KEY_DTYPE:
        mag = mag.float()
    return mag.view(_KEY_DTYPE[mag.dtype])


class Cut:
    """Membership in the k largest keys, equal keys going to the lower flat index first: keys
    above `thr`, plus the first `need` keys equal to it. Call on the blocks in order."""

    def __init__(self, thr: int, need: int):
        self.thr, self.need = thr, need
        self.left = need

    def restart(self) -> None:
        self.left = self.need

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        mask = keys > self.thr
        if self.left > 0:
            eq = keys == self.thr
            e = int(torch.count_nonzero(eq))
            if e > self.left:
                eq &= eq.reshape(-1).cumsum(0, dtype=torch.int64).view(eq.shape) <= self.left
                e = self.left
            mask |= eq
            self.left -= e
        return mask


def find_cut(blocks: Callable[[], Iterator[torch.Tensor]], sample: torch.Tensor, n: int, k: int) -> Cut:
    """The Cut of the k largest among n keys, streamed by `blocks()` (each call a fresh pass).

    Bisection on counts keeps count(keys >= lo) >= k > count(keys >= hi); a strided `sample` of
    the keys brackets the answer first, so usually two counting passes and one pass gathering
    the few keys left between the bounds (finished with kthvalue) suffice."""
    top = torch.iinfo(sample.dtype).max           # above every key of a number (inf included)
    if k <= 0:
        return Cut(top, 0)
    if k >= n:
        return Cut(-1, 0)

    def count_ge(v: int) -> int:
        return sum(int(torch.count_nonzero(kb >= v)) for kb in blocks())

    lo, c_lo, hi, c_hi = 0, n, top, 0
    s = torch.sort(sample.reshape(-1), descending=True).values
    m = s.numel()
    if m >= 64:
        q = k / n
        margin = 4 * math.sqrt(m * q * (1 - q)) + 8
        for v in (int(s[max(0, math.floor(q * m - margin))]) + 1, int(s[min(m - 1, math.ceil(q * m + margin))])):
            if lo < v < hi:
                c = count_ge(v)
                lo, c_lo, hi, c_hi = (v, c, hi, c_hi) if c >= k else (lo, c_lo, v, c)
    band_limit = max(_SAMPLE, n >> 4)
    while hi - lo > 1:
        if c_lo - c_hi <= band_limit:
            band = torch.cat([kb[(kb >= lo) & (kb < hi)] for kb in blocks()])
            need = k - c_hi                       # rank of the answer inside the band, from the top
            thr = int(torch.kthvalue(band, band.numel() - need + 1).values)
            return Cut(thr, k - c_hi - int(torch.count_nonzero(band > thr)))
        mid = (lo + hi) // 2
        c = count_ge(mid)
        lo, c_lo, hi, c_hi = (mid, c, hi, c_hi) if c >= k else (lo, c_lo, mid, c)
    return Cut(lo, k - c_hi)                      # every key in [lo, hi) equals lo


@dataclass
class KernelMask:
    """One block's mask in the form the combine kernel (native.py) applies it: "keep", "drop", "cuts"
    (membership in cuts[0] and not in cuts[1], their states being `lefts` at the block's start), "uniform"
    (u < p) or "bools"; `torch_mask` makes the same mask in torch, from that same starting state."""

    kind: str
    cuts: tuple[Cut, ...] = ()
    lefts: tuple[int, ...] = ()
    u: torch.Tensor | None = None
    p: float = 0.0
    bools: torch.Tensor | None = None

    def torch_mask(self, delta: torch.Tensor) -> torch.Tensor | None:
        if self.kind == "keep":
            return None
        if self.kind == "drop":
            return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
        if self.kind == "uniform":
            return (self.u < self.p).to(delta.device)
        if self.kind == "bools":
            return self.bools.to(delta.device)
        for cut, left in zip(self.cuts, self.lefts):
            cut.left = left
        keys = keys_of(delta)
        mask = self.cuts[0](keys)
        if len(self.cuts) > 1:
            mask &= ~self.cuts[1](keys)
        return mask


class MaskPlan:
    """Makes one model's mask block by block; `restart()` before each pass over the blocks."""

    def restart(self) -> None:
        pass

    def __call__(self, delta: torch.Tensor) -> torch.Tensor | None:
        return None                               # keep everything

    def kernel_mask(self, shape: torch.Size) -> KernelMask | None:
        """The next block's mask (`shape` rows) without its delta, or None: call the plan on the delta."""
        return KernelMask("keep") if type(self) is MaskPlan else None


class DropAll(MaskPlan):
    def __call__(self, delta: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)

    def kernel_mask(self, shape: torch.Size) -> KernelMask | None:
        return KernelMask("drop")


class RankWindow(MaskPlan):
    """Keep magnitude ranks [start, stop) counted from the largest: top(stop) minus top(start)."""

    def __init__(self, outer: Cut, inner: Cut | None):
        self.outer, self.inner = outer, inner

    def restart(self) -> None:
        self.outer.restart()
        if self.inner is not None:
            self.inner.restart()

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        keys = keys_of(delta)
        mask = self.outer(keys)
        if self.inner is not None:
            mask &= ~self.inner(keys)
        return mask

    def kernel_mask(self, shape: torch.Size) -> KernelMask | None:
        cuts = (self.outer,) if self.inner is None else (self.outer, self.inner)
        return KernelMask("cuts", cuts=cuts, lefts=tuple(c.left for c in cuts))


class RandomKeep(MaskPlan):
    """DARE: keep each entry independently with probability `density`.

    The draws are the seed's MT19937 stream, two 32-bit words per entry making a 53-bit uniform u
    ((first << 32 | second) mod 2⁵³ · 2⁻⁵³), kept when u < density: torch.rand's float64 stream. Not
    `bernoulli_`, whose stream depends on the CPU's vendor (MKL's generator on Intel), so the same
    recipe and seed give the same model on every machine."""

    def __init__(self, density: float, seed: int):
        self.density, self.seed = density, seed
        self.restart()

    def restart(self) -> None:
        self.stream = native.stream(self.seed)
        if self.stream is None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def uniforms(self, shape: torch.Size) -> torch.Tensor:
        """The next draws (valid until the next call)."""
        if self.stream is not None:
            return self.stream.uniforms(shape)
        return torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        keep = self.uniforms(delta.shape) < self.density
        return keep.to(delta.device)  # drawn on the CPU: the same mask whatever device merges

    def kernel_mask(self, shape: torch.Size) -> KernelMask | None:
        return KernelMask("uniform", u=self.uniforms(shape), p=self.density)


class RankKeep(RandomKeep):
    """DELLA MagPrune: per row, rank |delta| ascending (ties by position), map the ranks linearly
    onto [density − ε, density + ε] and keep each entry with that probability. A one-entry row
    keeps with probability `density`."""

    def __init__(self, density: float, epsilon: float, seed: int, rows: int):
        self.epsilon = epsilon
        # Ranking needs a sort per row, the costliest step of any mask here; the first pass keeps
        # its draws (one byte per entry, one allocation) and later passes replay them.
        self.rows, self.drawn, self.done, self.at = rows, None, False, 0
        super().__init__(density, seed)

    def restart(self) -> None:
        super().restart()
        self.done = self.done or self.at > 0
        self.at = 0

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        r0, self.at = self.at, self.at + delta.shape[0]
        if self.done:
            return self.drawn[r0:self.at]
        if self.drawn is None:
            self.drawn = torch.empty((self.rows, delta.shape[1]), dtype=torch.bool, device=delta.device)
        mask = self.drawn[r0:self.at]
        mask.copy_(self._draw(delta))
        return mask

    def kernel_mask(self, shape: torch.Size) -> KernelMask | None:
        if not self.done:
            return None                           # the first pass ranks the delta
        r0, self.at = self.at, self.at + shape[0]
        return KernelMask("bools", bools=self.drawn[r0:self.at])

    def _draw(self, delta: torch.Tensor) -> torch.Tensor:
        width = delta.shape[1]
        u = self.uniforms(delta.shape)
        if width == 1:
            return u.to(delta.device) < self.density
        scale, offset = 2 * self.epsilon / (width - 1), self.density - self.epsilon
        keep = native.rank_keep(delta, u, scale, offset)
        if keep is not None:
            return keep
        prob = row_ranks(delta).to(torch.float64).mul_(scale).add_(offset)
        return u.to(prob.device) < prob


def row_ranks(values: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D tensor, each entry's rank by |value| ascending, equal ones by position (int64).

    One stable sort of the whole block on the keys (row << key bits | magnitude key), which torch
    runs as a radix sort, instead of one comparison sort per row; NaNs rank above inf, all equal."""
    rows, width = values.shape
    keys = keys_of(values)
    bits = 8 * keys.element_size() - 1
    if bits > 31 or rows.bit_length() + bits > 62:    # float64 keys: one sort per row
        order = torch.argsort(keys, dim=1, stable=True)
        return torch.empty_like(order).scatter_(1, order, torch.arange(width, device=order.device).expand_as(order))
    nan = native.KEYS[values.dtype if values.dtype in native.KEYS else torch.float32][2]
    composite = keys.clamp(max=nan).to(torch.int64)
    composite |= (torch.arange(rows, device=keys.device) << bits).unsqueeze(1)
    order = torch.argsort(composite.view(-1), stable=True)
    ranks = torch.empty(rows * width, dtype=torch.int64, device=keys.device)
    ranks[order] = torch.arange(width, device=keys.device).repeat(rows)
    return ranks.view(rows, width)


def magnitude_plan(deltas: Callable[[], Iterator[torch.Tensor]], sample: torch.Tensor, n: int,
                   density: float, gamma: float = 0.0,
                   pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> MaskPlan:
    """TIES trim (gamma 0) or Breadcrumbs: drop the largest gamma fraction, then the smallest, so
    that `density` remains. When gamma·numel < 1 no large entry is dropped. `pair` (the model's tensor
    and the base, whose difference `deltas` streams) lets the native kernel find the cuts."""
    if density >= 1:
        return MaskPlan()
    keep = keep_count(density, n)
    if keep == 0:
        return DropAll()
    n_top = min(int(gamma * n), n - keep)         # fewer outliers dropped if density leaves no room
    sample_keys = keys_of(sample)

    def blocks() -> Iterator[torch.Tensor]:
        return (keys_of(d) for d in deltas())

    wanted = [n_top + keep] + ([n_top] if n_top > 0 else [])
    found = native.top_cuts(*pair, wanted) if pair is not None and all(0 < k < n for k in wanted) else None
    if found is not None:
        cuts = [Cut(thr, need) for thr, need in found]
    else:
        cuts = [find_cut(blocks, sample_keys, n, k) for k in wanted]
    return RankWindow(cuts[0], cuts[1] if n_top > 0 else None)


def strided_sample(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return flat[::max(1, flat.numel() // _SAMPLE)]


def materialize(plan: MaskPlan, delta: torch.Tensor) -> torch.Tensor | None:
    """The whole mask a plan gives `delta` (for small tensors and tests)."""
    rows = rows_of(delta)
    plan.restart()
    parts = [plan(rows[sl]) for sl in row_blocks(rows)]
    if any(p is None for p in parts):
        return None
    return torch.cat(parts).view(delta.shape)


def _plan_over(delta: torch.Tensor, density: float, gamma: float = 0.0) -> MaskPlan:
    rows = rows_of(delta)
    return magnitude_plan(lambda: (rows[sl] for sl in row_blocks(rows)), strided_sample(delta),
                          delta.numel(), density, gamma)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly the k largest |values|; equal ones go to the lower flat index first."""
    rows = rows_of(values)
    cut = find_cut(lambda: (keys_of(rows[sl]) for sl in row_blocks(rows)), keys_of(strided_sample(values)),
                   values.numel(), k)
    return materialize(RankWindow(cut, None), values)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """TIES trim of a whole tensor: keep the top `density` fraction of |delta|."""
    return materialize(_plan_over(delta, density), delta)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Breadcrumbs mask of a whole tensor."""
    return materialize(_plan_over(delta, density, gamma), delta)


def l1_rescale(l1_before: float, l1_after: float) -> float:
    """Factor giving the masked delta the L1 norm of the full one: `rescale` is not 1/density.
    1 when either norm is ~0 (nothing kept, or nothing to keep)."""
    if l1_before < 1e-12 or l1_after < 1e-12:
        return 1.0
    return l1_before / l1_after
