"""Samples whose gradient norm is NaN or infinite contribute exactly zero (``nonfinite="skip"``,
the default), are named in a warning and counted; ``nonfinite="raise"`` makes them an error.

The oracle: the same transform on the batch without those samples, which the masked step must
equal (to rounding) for every rule family's clipped sum: rank-one and ghost Linear,
instantiated Linear, convolutions with GroupNorm, embeddings and LayerNorm.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.testing.models import MLP, Linear4D, ResNetGN, batch_for

R = 0.3


class ScaledTokens(nn.Module):
    """Token ids scaled by a per-sample float (where a NaN can enter): Embedding, LayerNorm,
    Linear on ``[B, T, d]``."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln, self.fc = nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 5)

    def forward(self, ids, scale):
        return self.fc(self.ln(self.emb(ids) * scale[:, None, None])).mean(1)


class Wide(nn.Module):
    """One Linear with few features and no sequence: fx_bk instantiates per-sample grads."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def _inputs(name, model, b):
    if name == "tokens":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 11, (b, 4), generator=g)
        return (ids, torch.rand(b, generator=g, dtype=torch.float64) + 0.5), \
            torch.randint(0, 5, (b,), generator=g)
    if name == "wide":
        g = torch.Generator().manual_seed(0)
        return (torch.randn(b, 3, generator=g, dtype=torch.float64),), \
            torch.randint(0, 2, (b,), generator=g)
    x, y = batch_for(name, model, b, seed=0, dtype=torch.float64)
    return (x,), y


MODELS = {"mlp": MLP, "linear4d": Linear4D, "resnet_gn": ResNetGN, "tokens": ScaledTokens,
          "wide": Wide}
BAD = {2: float("nan"), 4: float("inf")}  # sample -> the value planted in its float input


def _poison(inputs):
    x = [t.clone() for t in inputs]
    floating = next(i for i, t in enumerate(x) if t.is_floating_point())
    for i, v in BAD.items():
        x[floating][i].view(-1)[0] = v
    return tuple(x)


def _step(model, inputs, y, compiled=False, **kw):
    model.zero_grad()
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum", **kw)
    run = torch.compile(bk) if compiled else bk
    F.cross_entropy(run(*inputs), y, reduction="sum").backward()
    return bk, [p.grad.clone() for p in model.parameters()]


# every family eager; compiled, one Linear family, the embedding family and the convolutions
# (instantiated and ghost sites: fx_bk::clipped_conv_weight_grad masks on CPU only in a step
# with a skipped sample) (CI time)
CASES = [(n, False) for n in MODELS] + [("mlp", True), ("tokens", True), ("resnet_gn", True)]


@pytest.mark.parametrize("name,compiled", CASES,
                         ids=[f"{n}-{'compiled' if c else 'eager'}" for n, c in CASES])
def test_nonfinite_samples_contribute_exactly_zero(name, compiled):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    inputs, y = _inputs(name, model, 6)
    keep = [i for i in range(6) if i not in BAD]
    _, want = _step(model, tuple(t[keep] for t in inputs), y[keep])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bk, got = _step(model, _poison(inputs), y, compiled=compiled)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    said = [str(w.message) for w in caught if "NaN or infinite" in str(w.message)]
    assert said and "2 of 6 samples" in said[0] and "[2, 4]" in said[0]
    assert bk.nonfinite_samples == 2
    norms = bk.last_per_sample_norms
    assert not torch.isfinite(norms[list(BAD)]).any() and torch.isfinite(norms[keep]).all()


def test_nonfinite_raise_stops_the_step():
    model = MLP().double()
    inputs, y = _inputs("mlp", model, 6)
    with pytest.raises(fx_bk.NonFiniteSampleError, match=r"batch indices \[2, 4\]"):
        _step(model, _poison(inputs), y, nonfinite="raise")
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_nonfinite_is_validated():
    with pytest.raises(fx_bk.ConfigError, match="nonfinite must be one of"):
        fx_bk.transform(MLP(), max_grad_norm=R, nonfinite="ignore")
