"""model_stock, sce and nearswap against numpy recomputations written from their definitions."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from merger import plugins
from merger.methods.base import MergeContext, NoParams


def method(name):
    return plugins.methods()[name]


def ctx() -> MergeContext:
    return MergeContext(name="w", generator=torch.Generator().manual_seed(0), dtype=torch.float32)


def family(seed: int, n: int, shape=(12, 20), noise: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = noise * torch.randn(shape, generator=g)  # correlated fine-tunes: a positive angle
    return base, [base + shared + noise * torch.randn(shape, generator=g) for _ in range(n)]


def np_model_stock(tensors, base, filter_wise: bool):
    b = base.double().numpy()
    ws = [t.double().numpy() for t in tensors]
    if filter_wise:
        rows = (lambda x: x.reshape(1, -1)) if b.ndim == 1 else (lambda x: x)
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731 - the whole tensor as one vector
    offs = [rows(w - b) for w in ws]
    cos = []
    for x, y in itertools.combinations(offs, 2):
        c = (x * y).sum(-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-6)
        cos.append(np.clip(c, -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    avg = rows(sum(ws) / n)
    return torch.from_numpy((t * avg + (1 - t) * rows(b)).reshape(b.shape))


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(12, 20), (30,)])
def test_model_stock(n, filter_wise, shape):
    base, ts = family(n, n, shape)
    cls = method("model_stock")
    got = cls().merge(ts, base, cls.Params(filter_wise=filter_wise), [NoParams()] * n, ctx())
    assert_close(got.double(), np_model_stock(ts, base, filter_wise), rtol=1e-5, atol=1e-5)


def test_model_stock_orthogonal_keeps_base_identical_is_average():
    base = torch.zeros(4)
    ts = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0, 1.0, 0])]
    cls = method("model_stock")
    assert_close(cls().merge(ts, base, cls.Params(), [NoParams()] * 3, ctx()), base)  # cos 0 → t = 0
    same = [torch.tensor([1.0, 2.0, 3.0, 4.0])] * 3
    assert_close(cls().merge(same, base, cls.Params(), [NoParams()] * 3, ctx()), same[0])  # cos 1 → t = 1


def np_sce(tensors, base, topk: float):
    b = base.double().numpy()
    d = np.stack([t.double().numpy() - b for t in tensors])
    if topk < 1:
        var = d.var(axis=0)
        k = int(topk * np.count_nonzero(var))
        mask = np.zeros(var.size)
        mask[np.argsort(-var.reshape(-1), kind="stable")[:k]] = 1
        d = d * mask.reshape(var.shape)
    energy = np.array([np.mean(x ** 2) for x in d])
    w = np.full(len(d), 1 / len(d)) if energy.sum() == 0 else energy / energy.sum()
    majority = np.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(d) == majority
    wb = w.reshape(-1, *[1] * b.ndim)
    div = (wb * agree).sum(0)
    div[div == 0] = 1
    return torch.from_numpy(b + (d * wb * agree).sum(0) / div)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce(topk):
    base, ts = family(7, 3)
    ts[2] = base + 2.0 * (ts[2] - base)  # unequal energies, so the weights matter
    cls = method("sce")
    got = cls().merge(ts, base, cls.Params(select_topk=topk), [NoParams()] * 3, ctx())
    assert_close(got.double(), np_sce(ts, base, topk), rtol=1e-5, atol=1e-5)


def test_sce_erases_minority_sign_by_hand():
    base = torch.zeros(3)
    ts = [torch.tensor([1.0, 1.0, -1.0]), torch.tensor([1.0, -3.0, -1.0])]
    cls = method("sce")
    got = cls().merge(ts, base, cls.Params(), [NoParams()] * 2, ctx())
    # energies 1 and 11/3 → w = 3/14, 11/14; entry 1: Σ = −2 → only −3 survives; others agree.
    assert_close(got, torch.tensor([1.0, -3.0, -1.0]))


@pytest.mark.parametrize("t", [1e-3, 0.05, 0.5, 10.0])
def test_nearswap(t):
    base, (other,) = family(8, 1)
    other[0, :5] = base[0, :5]  # identical entries: weight 1, value unchanged
    cls = method("nearswap")
    got = cls().merge([other], base, cls.Params(t=t), [NoParams()], ctx())
    b, o = base.double().numpy(), other.double().numpy()
    want = np.empty_like(b)
    for idx in np.ndindex(b.shape):
        diff = abs(b[idx] - o[idx])
        w = 1.0 if diff == 0 else min(max(t / diff, 0.0), 1.0)
        want[idx] = w * o[idx] + (1 - w) * b[idx]
    assert_close(got.double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6)


def test_nearswap_threshold_must_be_positive():
    with pytest.raises(ValueError):
        method("nearswap").Params(t=0)


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_streamed_in_many_blocks(topk, monkeypatch):
    from merger.methods import sparsify

    monkeypatch.setattr(sparsify, "BLOCK", 40)  # two rows per block
    base, ts = family(9, 3)
    cls = method("sce")
    got = cls().merge(ts, base, cls.Params(select_topk=topk), [NoParams()] * 3, ctx())
    assert_close(got.double(), np_sce(ts, base, topk), rtol=1e-5, atol=1e-5)
