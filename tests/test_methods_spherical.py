"""slerp, nuslerp, multislerp and karcher against numpy recomputations written from their
definitions, plus geometric invariants (unit norm, angle t·θ, the Karcher mean of two vectors is
their SLERP midpoint)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from merger import plugins
from merger.methods.base import MergeContext, NoParams


def method(name):
    return plugins.methods()[name]


def ctx(dtype=torch.float32) -> MergeContext:
    return MergeContext(name="w", generator=torch.Generator().manual_seed(0), dtype=dtype)


def rand(seed: int, shape=(16, 24), scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def np_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    cos = float(np.sum(ua * ub))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def slerp(t, base, other, dtype=torch.float32):
    cls = method("slerp")
    return cls().merge([other], base, cls.Params(t=t), [NoParams()], ctx(dtype))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_formula(t):
    a, b = rand(1), rand(2, scale=1.7)
    got = slerp(t, a, b)
    assert_close(got.double(), torch.from_numpy(np_slerp(t, a.double().numpy(), b.double().numpy())),
                 rtol=1e-5, atol=1e-5)


def test_slerp_endpoints_are_exact():
    a, b = rand(3), rand(4)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(1.0, a, b), b)


def test_slerp_geodesic_invariants():
    a, b = rand(5), rand(6)
    a, b = a / a.norm(), b / b.norm()
    theta = torch.arccos((a * b).sum())
    for t in (0.2, 0.7):
        r = slerp(t, a, b)
        assert_close(r.norm(), torch.tensor(1.0))
        assert_close(torch.arccos((r * a).sum() / r.norm()), t * theta, rtol=1e-4, atol=1e-4)


def test_slerp_nearly_colinear_falls_back_to_lerp():
    a = rand(7)
    b = 2.0 * a + 1e-4 * rand(8)
    assert_close(slerp(0.3, a, b), 0.7 * a + 0.3 * b)


def test_slerp_bf16():
    a, b = rand(9).bfloat16(), rand(10).bfloat16()
    got = slerp(0.4, a, b, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    want = np_slerp(0.4, a.double().numpy(), b.double().numpy())
    assert_close(got.double(), torch.from_numpy(want), rtol=2e-2, atol=2e-2)


def np_nuslerp_rows(t: float, a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """SLERP of every vector along `axis`, one by one."""
    out = np.empty_like(a)
    if axis == 0:
        for j in range(a.shape[1]):
            out[:, j] = np_slerp(t, a[:, j], b[:, j])
    else:
        for i in range(a.shape[0]):
            out[i] = np_slerp(t, a[i], b[i])
    return out


def nuslerp(tensors, base, w, **params):
    cls = method("nuslerp")
    return cls().merge(tensors, base, cls.Params(**params), [cls.ModelParams(weight=x) for x in w], ctx())


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("mode", ["flatten", "last_dim", "row_wise"])
def test_nuslerp(with_base, mode):
    base = rand(11)
    x, y = base + 0.3 * rand(12), base + 0.3 * rand(13)
    params = {"flatten": {}, "last_dim": {"nuslerp_flatten": False},
              "row_wise": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}[mode]
    got = nuslerp([x, y], base if with_base else None, (1.0, 3.0), **params)
    b = base.double().numpy()
    a0, a1 = x.double().numpy(), y.double().numpy()
    if with_base:
        a0, a1 = a0 - b, a1 - b
    t = 3.0 / 4.0
    want = np_slerp(t, a0, a1) if mode == "flatten" else np_nuslerp_rows(t, a0, a1, 0 if mode == "row_wise" else 1)
    if with_base:
        want = want + b
    assert_close(got.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


def test_nuslerp_zero_weight_sum_is_midpoint():
    x, y = rand(14), rand(15)
    assert_close(nuslerp([x, y], None, (1.0, -1.0)), nuslerp([x, y], None, (2.0, 2.0)))


def np_multislerp(tensors, weights, base=None, eps=1e-8):
    """Following the construction step by step, on stacked float64 copies."""
    x = np.stack([t.double().numpy().reshape(-1) for t in tensors])
    if base is not None:
        x = x - base.double().numpy().reshape(-1)
    w = np.array(weights, dtype=np.float64)
    w = w / w.sum()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangents = units - (units @ mean)[:, None] * mean
    tr = (tangents * w[:, None]).sum(0)
    tn = np.linalg.norm(tr) + eps
    res = (mean * np.cos(tn) + tr * np.sin(tn) / tn) * float((norms[:, 0] * w).sum())
    if base is not None:
        res = res + base.double().numpy().reshape(-1)
    return torch.from_numpy(res.reshape(tensors[0].shape))


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(with_base):
    base = rand(16)
    ts = [base + 0.5 * rand(17 + i) for i in range(3)]
    cls = method("multislerp")
    w = (0.5, 1.0, 2.5)
    got = cls().merge(ts, base if with_base else None, cls.Params(), [cls.ModelParams(weight=x) for x in w], ctx())
    assert_close(got.double(), np_multislerp(ts, w, base if with_base else None), rtol=1e-5, atol=1e-5)


def test_multislerp_of_two_is_a_slerp_direction_and_antipodal_falls_back():
    cls = method("multislerp")
    a = rand(20)
    got = cls().merge([a, -a], None, cls.Params(), [cls.ModelParams(weight=1.0)] * 2, ctx())
    assert_close(got, torch.zeros_like(a))  # weights 1/2, 1/2 on a and −a: the linear fallback
    one = cls().merge([a], None, cls.Params(), [cls.ModelParams(weight=3.0)], ctx())
    assert torch.equal(one, a)
    # Two unit vectors with equal weights: the normalised mean is their SLERP midpoint.
    u, v = a / a.norm(), rand(21) / rand(21).norm()
    mid = cls().merge([u, v], None, cls.Params(), [cls.ModelParams(weight=1.0)] * 2, ctx())
    assert_close(mid, slerp(0.5, u, v), rtol=1e-5, atol=1e-6)


def np_karcher(tensors, max_iter=10, tol=1e-5):
    x = [t.double().numpy().reshape(-1) for t in tensors]
    norms = [np.linalg.norm(v) for v in x]
    units = [v / n for v, n in zip(x, norms)]
    a = 1.0 / len(x)
    m = sum(a * u for u in units)
    m = m / np.linalg.norm(m)
    for _ in range(max_iter):
        tangent = np.zeros_like(m)
        for u in units:
            c = np.clip(m @ u, -1, 1)
            th = np.arccos(c)
            if th < tol:
                continue
            tangent += a * th / np.sin(th) * (u - c * m)
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        m = np.cos(step) * m + np.sin(step) * tangent / step
        m = m / np.linalg.norm(m)
    return torch.from_numpy((np.mean(norms) * m).reshape(tensors[0].shape))


def test_karcher_matches_iteration_and_is_a_critical_point():
    ts = [rand(30 + i, scale=1 + i) for i in range(4)]
    cls = method("karcher")
    got = cls().merge(ts, None, cls.Params(max_iter=50, tol=1e-9), [NoParams()] * 4, ctx())
    assert_close(got.double(), np_karcher(ts, 50, 1e-9), rtol=1e-5, atol=1e-5)
    # At the Karcher mean the log maps of the inputs sum to zero.
    m = got.double().reshape(-1) / got.double().norm()
    total = torch.zeros_like(m)
    for t in ts:
        u = t.double().reshape(-1) / t.double().norm()
        c = (m @ u).clamp(-1, 1)
        th = torch.arccos(c)
        total += th / torch.sin(th) * (u - c * m)
    assert total.norm() < 1e-5
    assert_close(got.norm(), torch.tensor(sum(float(t.norm()) for t in ts) / 4), rtol=1e-5, atol=0)


def test_karcher_of_two_is_the_slerp_midpoint():
    a, b = rand(40), rand(41)
    cls = method("karcher")
    got = cls().merge([a, b], None, cls.Params(), [NoParams()] * 2, ctx())
    ua, ub = a / a.norm(), b / b.norm()
    assert_close(got, slerp(0.5, ua, ub) * (a.norm() + b.norm()) / 2, rtol=1e-5, atol=1e-6)
    default = cls().merge([a, b, a], None, cls.Params(), [NoParams()] * 3, ctx())
    assert_close(default.double(), np_karcher([a, b, a]), rtol=1e-5, atol=1e-5)
