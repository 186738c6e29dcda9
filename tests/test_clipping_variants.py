"""Clipping functions (abadi / automatic / global) and styles (all-layer / per-layer / groups)
against the vmap per-sample oracle, and the norms exposed for monitoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fx_bk
from fx_bk import ConfigError, UnsupportedModelError
from fx_bk.testing import max_rel_err, per_sample_grads


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def _oracle(model, x, y, groups, bounds, clipping):
    """Independent of fx_bk: per-sample grads by vmap, one norm per group, clip, sum."""
    g = per_sample_grads(model, x, y)
    factors, norms = {}, []
    for names, r in zip(groups, bounds):
        n = torch.sqrt(sum(g[p].flatten(1).pow(2).sum(1) for p in names))
        norms.append(n)
        c = {"abadi": torch.clamp(r / (n + 1e-6), max=1.0), "automatic": r / (n + 0.01),
             "global": (n <= r).double()}[clipping]
        factors.update({p: c for p in names})
    grads = {p: torch.einsum("b,b...->...", factors[p], v) for p, v in g.items()}
    return grads, torch.stack(norms, 1)


PER_LAYER = [["0.weight", "0.bias"], ["2.weight", "2.bias"], ["3.weight", "3.bias"]]
LINEARS_VS_NORM = [["0.weight", "0.bias", "3.weight", "3.bias"], ["2.weight", "2.bias"]]


STYLES = {"all-layer": ("all-layer", None, 3.0), "per-layer": ("per-layer", PER_LAYER, 2.0),
          "groups": (LINEARS_VS_NORM, LINEARS_VS_NORM, [3.0, 0.7])}
# every function x style eager; compiled, each function once and each style once (CI time)
CASES = [(c, s, False) for c in ("abadi", "automatic", "global") for s in STYLES] + [
    ("abadi", "groups", True), ("automatic", "all-layer", True), ("global", "per-layer", True)]


@pytest.mark.parametrize("clipping, style_id, compiled", CASES,
                         ids=[f"{c}-{s}-{'compiled' if k else 'eager'}" for c, s, k in CASES])
def test_clipping_matches_oracle(clipping, style_id, compiled):
    style, groups, bounds = STYLES[style_id]
    model = _model()
    torch.manual_seed(1)  # norms from 0.5 to 4.8: each bound clips some samples, not all
    x = torch.randn(7, 5, dtype=torch.float64) * torch.linspace(0.05, 3, 7).double()[:, None]
    y = torch.randint(0, 3, (7,))
    bk = fx_bk.transform(model, max_grad_norm=bounds, clipping=clipping, clipping_style=style)
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    model.zero_grad()
    nn.functional.cross_entropy(run(x), y).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    groups = groups or [[n for n, _ in model.named_parameters()]]
    r = bounds if isinstance(bounds, list) else [bounds] * len(groups)
    ref, norms = _oracle(model, x, y, groups, r, clipping)
    assert max_rel_err(got, ref) <= 1e-10
    seen = bk.last_per_sample_norms
    torch.testing.assert_close(seen, norms if style != "all-layer" else norms[:, 0])
    if clipping == "global":  # the test must exercise both outcomes of the indicator
        assert (norms <= torch.tensor(r)).any() and (norms > torch.tensor(r)).any()
    assert bk.bk_config.sensitivity == pytest.approx(math.sqrt(sum(v * v for v in r)))


def test_norms_are_per_step():
    model = _model()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    assert bk.last_per_sample_norms is None
    for b in (3, 6):
        x, y = torch.randn(b, 5, dtype=torch.float64), torch.randint(0, 3, (b,))
        nn.functional.cross_entropy(bk(x), y).backward()
        torch.testing.assert_close(bk.last_per_sample_norms,
                                   _oracle(model, x, y, [[n for n, _ in model.named_parameters()]],
                                           [1.0], "abadi")[1][:, 0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(clipping="median"), "clipping must be one of"),
    (dict(clipping_style="per-block"), "clipping_style must be"),
    (dict(clipping_style=[["0.weight"]]), r"are in no clipping group"),
    (dict(clipping_style=[["0.weight", "nope"]]), "names 'nope', which is not a trainable"),
    (dict(clipping_style=[["0.weight"], ["0.weight"]]), "is in clipping groups 0 and 1"),
    (dict(max_grad_norm=[1.0, 2.0]), "2 values but there are no clipping groups"),
    (dict(clipping_style="per-layer", max_grad_norm=[1.0, 2.0]), "but there are 3 clipping"),
])
def test_bad_clipping_config(kwargs, match):
    kwargs = {"max_grad_norm": 1.0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        fx_bk.transform(_model(), **kwargs)


def test_group_splitting_one_op_is_rejected():
    """A Linear's weight and bias share one per-sample norm computation: they must be in the
    same group (a clear error, not a wrong norm)."""
    model = _model()
    groups = [["0.weight"], ["0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]]
    bk = fx_bk.transform(model, max_grad_norm=1.0, clipping_style=groups)
    with pytest.raises(UnsupportedModelError, match=r"clip-group-split.*'0.bias', '0.weight'"):
        bk(torch.randn(3, 5, dtype=torch.float64))
