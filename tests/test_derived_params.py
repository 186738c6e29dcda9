"""Sites on values computed from trainable parameters alone (``passes/find_derived_params``):
``1 + w``, ``w.to(dtype)``, ``gamma.reshape(1, -1, 1, 1)``, weight standardization,
``_weight_norm``, a bias table gathered by constant indices, an embedding of relative-position
buckets broadcast into the scores, ``h @ W.T`` next to W's embedding — each exact against the
per-sample loop; and the derivations fx_bk must refuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.testing import assert_matches_per_sample

from . import zoo


class RelativeBucketBias(nn.Module):
    """T5: an embedding of relative-position buckets ``[T, T] -> [T, T, H]``, permuted and
    broadcast into the batched attention scores."""

    def __init__(self, t=5, heads=2):
        super().__init__()
        self.rel = nn.Embedding(7, heads)
        self.q = nn.Linear(4, 4)
        self.out = nn.Linear(t, 2)
        i = torch.arange(t)
        self.register_buffer("buckets", (i[None] - i[:, None]).clamp(-3, 3) + 3)

    def forward(self, x):
        q = self.q(x)
        scores = (q @ q.transpose(1, 2)).unsqueeze(1)  # [B, 1, T, T]
        bias = self.rel(self.buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        return self.out((scores + bias).softmax(-1).mean(1)).sum(1)


class CastAndTranspose(nn.Module):
    """``F.linear(x, w.to(dtype), b.to(dtype))`` (the parameter itself) and ``h @ v.t()``
    (an isometry of v: ghost norm kept)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.b = nn.Parameter(torch.zeros(5))
        self.v = nn.Parameter(torch.randn(3, 5) * 0.3)

    def forward(self, x):
        h = F.linear(x, self.w.to(x.dtype), self.b.to(x.dtype)).relu()
        return h @ self.v.t()


class InPlaceOnCopy(nn.Module):
    """In-place ops on a copy of a parameter, then a Linear of it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        w = self.w.clone()
        w.mul_(0.5)
        w.add_(1.0)
        return self.fc(F.linear(x, w))


class ScaledShifts(nn.Module):
    """``w + w`` and ``c + 2 w`` scale the gradient (not isometries: norms must not be taken
    from the site); ``1 + v - 0.5`` is one (the site's norm is v's)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6) * 0.3)
        self.u = nn.Parameter(torch.randn(3, 6) * 0.3)
        self.v = nn.Parameter(torch.randn(3, 6) * 0.3)

    def forward(self, x):
        return (F.linear(x, self.w + self.w) + F.linear(x, torch.add(1.0, self.u, alpha=2.0))
                + F.linear(x, 1.0 + self.v - 0.5))


CASES = {
    "gemma_norm": (zoo.GemmaNormLike, lambda g, b: zoo._ids(g, b)),
    "layer_scale": (zoo.ConvNeXtLike, lambda g, b: torch.randn(b, 3, 8, 8, generator=g)),
    "std_conv": (zoo.ResNetV2Like, lambda g, b: torch.randn(b, 3, 8, 8, generator=g)),
    "weight_norm": (zoo.WeightNormConv, lambda g, b: torch.randn(b, 6, 4, generator=g)),
    "relative_buckets": (RelativeBucketBias, lambda g, b: torch.randn(b, 5, 4, generator=g)),
    "bias_table": (zoo.WindowAttention, lambda g, b: torch.randn(b, 4, 8, generator=g)),
    "cast_and_transpose": (CastAndTranspose, lambda g, b: torch.randn(b, 6, generator=g)),
    "manual_tied_head": (zoo.ManualTiedLM, lambda g, b: zoo._ids(g, b)),
    "in_place_on_copy": (InPlaceOnCopy, lambda g, b: torch.randn(b, 6, generator=g)),
    "scaled_shifts": (ScaledShifts, lambda g, b: torch.randn(b, 6, generator=g)),
}


def _loss(out, _):
    return out.pow(2).sum()  # summed over the batch: loss_reduction="sum"


def _run(name, dtype, compiled=False, batch=4, reduction="sum"):
    torch.manual_seed(0)
    cls, make = CASES[name]
    model = cls().to(dtype)
    x = make(torch.Generator().manual_seed(1), batch)
    x = x.to(dtype) if x.is_floating_point() else x
    if compiled:
        torch._dynamo.reset()
    loss = _loss if reduction == "sum" else (lambda out, _: out.pow(2).flatten(1).sum(1).mean())
    return assert_matches_per_sample(model, loss, (x, None), max_grad_norm=0.05,
                                     loss_reduction=reduction, compile=compiled, tol=1.0)


@pytest.mark.parametrize("name", CASES)
def test_derived_parameter_sites_are_exact_float64(name):
    assert _run(name, torch.float64) <= 1e-12


@pytest.mark.parametrize("name", ["gemma_norm", "std_conv", "relative_buckets",
                                  "manual_tied_head"])
def test_derived_parameter_sites_are_exact_compiled_float32(name):
    assert _run(name, torch.float32, compiled=True) <= 2e-5


def test_mean_reduction_and_other_batch_sizes():
    for batch in (1, 7):
        assert _run("weight_norm", torch.float64, batch=batch, reduction="mean") <= 1e-12


def _sites(model, x):
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    bk(x)
    return bk.programs[-1].prog


def test_a_cast_is_the_parameter_itself_and_an_isometry_keeps_the_ghost_norm():
    prog = _sites(CastAndTranspose().double(), torch.randn(3, 6, dtype=torch.float64))
    linear = [s for s in prog.sites if s.rule.name == "linear"]
    assert {n for s in linear for n in s.params.values()} >= {"w", "b"}  # no derived name
    matmul = next(s for s in prog.sites if "<" in next(iter(s.params.values())))
    assert "instantiate" not in str(matmul.strategy)
    assert "isometric" in matmul.bundle_note


def test_only_true_isometries_keep_the_site_norm():
    prog = _sites(ScaledShifts().double(), torch.randn(3, 6, dtype=torch.float64))
    source = {d.name: d.sources for d in prog.derived.values()}
    isometric = {source[n] for s in prog.sites for n in s.params.values()
                 if "(isometric)" in s.bundle_note}
    assert isometric == {("v",)}


def test_explain_shows_the_parameter_only_chain():
    text = fx_bk.explain(zoo.ResNetV2Like(), torch.randn(2, 3, 8, 8))
    assert "vmap(vjp) of" in text and "batch_norm" in text


class DropConnect(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return F.linear(x, F.dropout(self.fc.weight, 0.5, training=True), self.fc.bias)


class BatchWrittenIntoCopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        w = self.w * 1.0
        w.add_(x[:1, :6].sum() * 0)  # a batch value written into the parameter's copy
        return x @ w.t()


def test_a_random_op_on_a_parameter_is_rejected():
    bk = fx_bk.transform(DropConnect(), max_grad_norm=1.0)
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"aten\.dropout.*fc\.weight.*random"):
        bk(torch.randn(3, 6))


def test_a_batch_written_in_place_into_a_parameter_copy_is_rejected():
    bk = fx_bk.transform(BatchWrittenIntoCopy(), max_grad_norm=1.0)
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"written in place with batched"):
        bk(torch.randn(3, 6))


class HugeTiedTranspose(nn.Module):
    """``h @ E.T`` next to the embedding E: not an isometry of one use, so the per-sample
    gradient of E would be instantiated — too large here."""

    def __init__(self, vocab=70_000, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)

    def forward(self, ids):
        return self.emb(ids) @ self.emb.weight.T


def test_a_too_large_instantiated_derivation_is_rejected_with_advice():
    bk = fx_bk.transform(HugeTiedTranspose(), max_grad_norm=1.0)
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"emb\.weight.*F\.linear"):
        bk(torch.randint(0, 100, (2, 3)))
