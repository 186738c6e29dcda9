"""The DP properties themselves: bounded per-sample contribution and bounded sensitivity."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fx_bk
from fx_bk.testing import fx_bk_grads
from fx_bk.testing.models import MODELS, batch_for

SLACK = 1 + 1e-6 + 1e-12  # C_i = R / (norm + 1e-6) <= R / norm; f64 rounding


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for _, g in sorted(grads.items())])


cases = st.tuples(
    st.sampled_from(sorted(MODELS)),
    st.integers(2, 9),  # batch size
    st.floats(1e-4, 1e2),  # R
    st.integers(0, 10_000),  # seed
    st.sampled_from(["mean", "sum"]),
)


def _setup(case):
    """(clipped-sum function of a batch, batch, R) for one hypothesis case, in float64."""
    name, b, norm, seed, reduction = case
    torch.manual_seed(seed)
    model = MODELS[name]().double()
    bk = fx_bk.transform(model, max_grad_norm=norm, loss_reduction=reduction)
    x, y = batch_for(name, model, b, seed=seed, dtype=torch.float64)
    x2, y2 = batch_for(name, model, b, seed=seed + 1, dtype=torch.float64)
    return (lambda xb, yb: _flat(fx_bk_grads(bk, model, xb, yb, reduction))), (x, y), (x2, y2)


@settings(max_examples=20, deadline=None)
@given(cases)
def test_each_sample_contributes_at_most_r(case):
    clipped_sum, (x, y), _ = _setup(case)
    b, norm = len(x), case[2]
    full = clipped_sum(x, y)
    for i in range(b):
        keep = torch.tensor([j for j in range(b) if j != i])
        rest = clipped_sum(x[keep], y[keep])
        contribution = (full - rest).norm().item()
        assert contribution <= norm * SLACK, (i, contribution, norm)


@settings(max_examples=20, deadline=None)
@given(cases)
def test_replacing_one_sample_moves_the_sum_by_at_most_2r(case):
    clipped_sum, (x, y), (x2, y2) = _setup(case)
    b, norm = len(x), case[2]
    x_swapped, y_swapped = x.clone(), y.clone()
    x_swapped[b // 2], y_swapped[b // 2] = x2[0], y2[0]
    before, after = clipped_sum(x, y), clipped_sum(x_swapped, y_swapped)
    assert (before - after).norm().item() <= 2 * norm * SLACK


def test_tiny_r_clips_every_sample_to_norm_r():
    """With R far below every gradient norm, each contribution has norm R (up to 1e-6 rel)."""
    model = MODELS["transformer"]().double()
    norm, b = 1e-4, 6
    bk = fx_bk.transform(model, max_grad_norm=norm)
    x, y = batch_for("transformer", model, b, seed=1, dtype=torch.float64)
    full = _flat(fx_bk_grads(bk, model, x, y, "mean"))
    for i in range(b):
        keep = torch.tensor([j for j in range(b) if j != i])
        rest = _flat(fx_bk_grads(bk, model, x[keep], y[keep], "mean"))
        assert abs((full - rest).norm().item() / norm - 1) < 1e-5
