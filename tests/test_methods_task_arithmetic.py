"""The task-vector family against a plain stacked recomputation written here in numpy (float64):
masks, L1 rescale, TIES sign election, divisors, λ — plus the edge cases and the random methods'
statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from merger import plugins
from merger.methods import sparsify
from merger.methods.base import MergeContext

FAMILY = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear"]
ELECT = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
DEFAULTS = {  # (normalize, rescale) per the semantics table
    "task_arithmetic": (False, False), "ties": (True, False), "dare_linear": (False, True),
    "dare_ties": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
    "della": (True, True), "della_linear": (False, True)}


def method(name):
    return plugins.methods()[name]


def ctx(seed: int = 0, dtype=torch.float32) -> MergeContext:
    return MergeContext(name="w", generator=torch.Generator().manual_seed(seed), dtype=dtype)


def inputs(seed: int = 0, shape=(24, 40), n: int = 3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [(base + 0.2 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def np_combine(tensors, base, weights, masks, *, rescale, elect, normalize, lam):
    """Reference written from the definitions: stack, mask, rescale (L1), elect, divide."""
    b = base.double().numpy()
    deltas = [t.double().numpy() - b for t in tensors]
    kept = []
    for d, m in zip(deltas, masks):
        k = d if m is None else d * m
        if rescale and m is not None and np.abs(k).sum() > 1e-12 and np.abs(d).sum() > 1e-12:
            k = k * (np.abs(d).sum() / np.abs(k).sum())
        kept.append(k)
    weighted = np.stack([w * k for w, k in zip(weights, kept)])
    if elect:
        majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(weighted) == majority
        mixed = (weighted * agree).sum(0)
        divisor = (np.array(weights).reshape(-1, *[1] * b.ndim) * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return torch.from_numpy(b + lam * mixed)


def np_magnitude_mask(d: torch.Tensor, density: float) -> np.ndarray:
    flat = np.abs(d.double().numpy().reshape(-1))
    k = max(1, int(density * flat.size)) if density > 0 else 0
    mask = np.zeros(flat.size)
    mask[np.argsort(-flat, kind="stable")[:k]] = 1
    return mask.reshape(d.shape)


def np_outlier_mask(d: torch.Tensor, density: float, gamma: float) -> np.ndarray:
    flat = np.abs(d.double().numpy().reshape(-1))
    n = flat.size
    keep = max(1, int(density * n))
    top = min(int(gamma * n), n - keep)
    mask = np.zeros(n)
    mask[np.argsort(-flat, kind="stable")[top:top + keep]] = 1
    return mask.reshape(d.shape)


def drawn_masks(cls, tensors, base, params, mps, seed):
    """The random methods' masks as the method draws them for this seed (checked statistically
    in test_methods_sparsify and below); the combination around them is recomputed here."""
    masks = cls().masks(tensors, base, params, mps, ctx(seed=seed))
    return [None if m is None else m.double().numpy() for m in masks]


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("density", [0.35, 1.0])
@pytest.mark.parametrize("flags", ["defaults", "flipped"])
def test_family_matches_reference(name, density, flags):
    base, ts = inputs(1)
    weights, lam = [0.6, -0.3, 1.1], 0.8
    normalize, rescale = DEFAULTS[name]
    if flags == "flipped":
        normalize, rescale = not normalize, not rescale
    cls = method(name)
    extra = {"breadcrumbs": {"gamma": 0.05}, "breadcrumbs_ties": {"gamma": 0.05}, "della": {"epsilon": 0.2},
             "della_linear": {"epsilon": 0.2}}.get(name, {})
    mps = [cls.ModelParams(weight=w, density=density, **extra) for w in weights]
    params = cls.Params(normalize=normalize, rescale=rescale, **{"lambda": lam})
    got = cls().merge(ts, base, params, mps, ctx(seed=4))
    if name.startswith(("dare", "della")):
        masks = drawn_masks(cls, ts, base, params, mps, seed=4)
    elif name.startswith("breadcrumbs"):
        masks = [None if density >= 1 else np_outlier_mask(t - base, density, 0.05) for t in ts]
    else:
        masks = [None if density >= 1 else np_magnitude_mask(t - base, density) for t in ts]
    if not name.startswith(("dare", "della")):  # the deterministic masks: the method's own equal ours
        for own, ref in zip(cls().masks(ts, base, params, mps, ctx()), masks):
            assert (own is None) == (ref is None) and (own is None or np.array_equal(own.numpy(), ref > 0))
    want = np_combine(ts, base, weights, masks, rescale=rescale, elect=name in ELECT, normalize=normalize, lam=lam)
    assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY)
def test_density_one_is_plain_task_arithmetic_and_zero_is_base(name):
    base, ts = inputs(2)
    cls = method(name)
    extra = {"epsilon": 0.1} if name.startswith("della") else {}
    one = cls().merge(ts, base, cls.Params(normalize=False, rescale=True),
                      [cls.ModelParams(weight=w, density=1.0, **extra) for w in (0.5, 0.25, 0.25)], ctx())
    if name in ELECT:  # density 1 keeps every delta; only the election can still drop entries
        want = np_combine(ts, base, [0.5, 0.25, 0.25], [None] * 3, rescale=True, elect=True, normalize=False, lam=1)
    else:
        want = base + 0.5 * (ts[0] - base) + 0.25 * (ts[1] - base) + 0.25 * (ts[2] - base)
    assert_close(one.double(), want.double(), rtol=1e-6, atol=1e-6)
    zero = cls().merge(ts, base, cls.Params(rescale=True),
                       [cls.ModelParams(weight=1.0, density=0.0, **extra) for _ in ts], ctx())
    assert_close(zero, base, rtol=0, atol=0)


def test_ties_sign_conflicts_by_hand():
    # Three models, four entries; trimmed deltas below chosen so each election case occurs.
    base = torch.zeros(4)
    ts = [torch.tensor([1.0, -2.0, 3.0, 0.5]),
          torch.tensor([-3.0, -1.0, 1.0, -0.5]),
          torch.tensor([1.0, 4.0, 0.0, 0.0])]
    cls = method("ties")
    got = cls().merge(ts, base, cls.Params(), [cls.ModelParams(weight=1.0) for _ in ts], ctx())
    # entry 0: sum −1 → negative wins: only −3 (model 1) → −3/1
    # entry 1: sum 1 → positive: only 4 → 4
    # entry 2: sum 4 → positive: 3 and 1 agree, the zero never counts → (3+1)/2
    # entry 3: sum 0 → counts as positive: 0.5 → 0.5
    assert_close(got, torch.tensor([-3.0, 4.0, 2.0, 0.5]))
    weighted = cls().merge(ts, base, cls.Params(), [cls.ModelParams(weight=w) for w in (2.0, 1.0, 1.0)], ctx())
    # weights enter the election and the divisor: entry 0: 2−3+1 = 0 → positive: (2·1 + 1·1)/(2+1)
    assert_close(weighted[0], torch.tensor(1.0))
    nonorm = cls().merge(ts, base, cls.Params(normalize=False), [cls.ModelParams(weight=1.0) for _ in ts], ctx())
    assert_close(nonorm, torch.tensor([-3.0, 4.0, 4.0, 0.5]))


def test_ties_trim_with_ties_in_magnitude():
    base = torch.zeros(6)
    t = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 1.0])  # five equal magnitudes; keep 3 = the first three
    cls = method("task_arithmetic")
    got = cls().merge([t], base, cls.Params(), [cls.ModelParams(weight=1.0, density=0.5)], ctx())
    assert_close(got, torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, 0.0]))


def test_rescale_keeps_l1_norm_not_inverse_density():
    base, ts = inputs(3, shape=(200, 300), n=1)
    delta = ts[0] - base
    for name in ("dare_linear", "task_arithmetic", "breadcrumbs", "della_linear"):
        cls = method(name)
        extra = {"epsilon": 0.1} if name.startswith("della") else {}
        got = cls().merge(ts, base, cls.Params(rescale=True), [cls.ModelParams(weight=1.0, density=0.2, **extra)],
                          ctx(seed=11)) - base
        kept = got != 0
        assert abs(kept.float().mean().item() - 0.2) < 0.01, name
        assert_close(got.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
        scale = delta.abs().sum() / delta[kept].abs().sum()
        assert_close(got[kept], delta[kept] * scale)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_seeded(name):
    base, ts = inputs(4)
    cls = method(name)
    mps = [cls.ModelParams(weight=0.5, density=0.5) for _ in ts]
    a = cls().merge(ts, base, cls.Params(), mps, ctx(seed=21))
    b = cls().merge(ts, base, cls.Params(), mps, ctx(seed=21))
    c = cls().merge(ts, base, cls.Params(), mps, ctx(seed=22))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_inputs_are_not_modified():
    base, ts = inputs(5)
    copies = [t.clone() for t in ts], base.clone()
    for name in FAMILY:
        cls = method(name)
        cls().merge(ts, base, cls.Params(), [cls.ModelParams(weight=1.0, density=0.4) for _ in ts], ctx())
    assert all(torch.equal(a, b) for a, b in zip(ts, copies[0])) and torch.equal(base, copies[1])


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_bf16_inputs(name):
    base, ts = inputs(6, dtype=torch.bfloat16)
    cls = method(name)
    # Dyadic weights: float32 accumulation of bf16 products is then exact, so near-zero election
    # sums get the same sign as in the float64 reference.
    mps = [cls.ModelParams(weight=w, density=0.5) for w in (0.75, 0.5, 0.25)]
    got = cls().merge(ts, base, cls.Params(), mps, ctx(seed=3, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16
    normalize, rescale = DEFAULTS[name]
    if name == "dare_ties":
        masks = drawn_masks(cls, ts, base, cls.Params(), mps, seed=3)
    elif name == "ties":
        masks = [np_magnitude_mask(t - base, 0.5) for t in ts]
    else:
        masks = [np_outlier_mask(t - base, 0.5, 0.01) for t in ts]
    # bf16 arithmetic rounds the deltas (masks on bf16 magnitudes, whose ties are common, stay exact).
    bf_base = base.double()
    deltas = [(t - base).double() for t in ts]
    want = np_combine([bf_base + d for d in deltas], bf_base, [0.75, 0.5, 0.25], masks, rescale=rescale,
                      elect=True, normalize=normalize, lam=1.0)
    assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_della_epsilon_validator():
    cls = method("della")
    with pytest.raises(ValueError, match="density ± epsilon"):
        cls.ModelParams(weight=1, density=0.9, epsilon=0.15)
    cls.ModelParams(weight=1, density=1.0, epsilon=0.15)  # density 1 keeps everything: no range needed
    cls.ModelParams(weight=1, density=0.5, epsilon=0.15)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties", "della", "dare_linear"])
def test_streamed_in_many_blocks(name, monkeypatch):
    # Tiny blocks (2 rows each) so masks, ties in magnitude and the election cross block edges.
    monkeypatch.setattr(sparsify, "BLOCK", 64)
    base, ts = inputs(12, shape=(50, 30))
    ts = [base + (t - base).mul(8).round().div(8) for t in ts]  # a coarse grid: many equal magnitudes
    cls = method(name)
    extra = {"gamma": 0.02} if name.startswith("breadcrumbs") else {"epsilon": 0.1} if name == "della" else {}
    mps = [cls.ModelParams(weight=w, density=0.4, **extra) for w in (0.6, 0.3, 0.8)]
    params = cls.Params()
    got = cls().merge(ts, base, params, mps, ctx(seed=2))
    normalize, rescale = DEFAULTS[name]
    if name.startswith(("dare", "della")):
        masks = drawn_masks(cls, ts, base, params, mps, seed=2)
    elif name == "ties":
        masks = [np_magnitude_mask(t - base, 0.4) for t in ts]
    else:
        masks = [np_outlier_mask(t - base, 0.4, 0.02) for t in ts]
    want = np_combine(ts, base, [0.6, 0.3, 0.8], masks, rescale=rescale, elect=name in ELECT,
                      normalize=normalize, lam=1.0)
    assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
