"""The clip stage's pool of small per-sample gradients (fx_bk/rules/pool.py): the pooled norm
and clipped sums equal the per-tensor ones, and only what the contract allows is pooled."""

from __future__ import annotations

import torch

from fx_bk.rules import squared_norm, weighted_sum
from fx_bk.rules.pool import (
    POOL_MAX_ELEMENTS,
    GradientPool,
    instantiated_norm,
    instantiated_sum,
    pooling,
)

B = 5


def _tensors(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(B, *s, generator=g, dtype=dtype) for s in ((3,), (2, 4), (7,))]
    ts[1][2, 0, 1] = float("nan")  # sample 2 is non-finite: skipped (c = 0)
    ts[2][2, 3] = float("inf")
    c = torch.rand(B, generator=g, dtype=dtype) + 0.1
    c[2] = 0.0
    return ts, c


def test_pooled_norm_and_sums_equal_the_plain_ones():
    ts, c = _tensors()
    pool = GradientPool()
    with pooling(pool):
        assert [instantiated_norm(t) for t in ts] == [0, 0, 0]  # counted by the pool instead
    expected = sum(squared_norm(t) for t in ts)
    torch.testing.assert_close(pool.norm_sq(), expected, equal_nan=True)
    pool.c = c
    with pooling(pool):
        sums = [instantiated_sum(c, t) for t in ts]
    for t, s in zip(ts, sums):
        assert s.shape == t.shape[1:]
        assert torch.isfinite(s).all()  # the NaN/Inf sample adds exactly zero
        torch.testing.assert_close(s, weighted_sum(c, t))


def test_what_is_not_pooled_is_computed_alone():
    ts, c = _tensors()
    big = torch.randn(B, POOL_MAX_ELEMENTS + 1, dtype=torch.float64)
    other_dtype = torch.randn(B, 3, dtype=torch.float32)
    pool = GradientPool()
    with pooling(pool):
        instantiated_norm(ts[0])
        for t in (big, other_dtype):  # too large / not the pool's dtype: a real norm
            torch.testing.assert_close(instantiated_norm(t), squared_norm(t))
    assert len(pool.tensors) == 1
    pool.c = c
    with pooling(pool):
        # not the group's c (same values, another tensor) and a tensor the pool does not hold
        torch.testing.assert_close(instantiated_sum(c.clone(), ts[0]), weighted_sum(c, ts[0]))
        torch.testing.assert_close(instantiated_sum(c, ts[1]), weighted_sum(c, ts[1]),
                                   equal_nan=True)
        assert pool._sums is None  # neither touched the pooled sum
    # no pool active (composite handlers): the plain functions
    torch.testing.assert_close(instantiated_norm(ts[0]), squared_norm(ts[0]))
    torch.testing.assert_close(instantiated_sum(c, ts[0]), weighted_sum(c, ts[0]))
