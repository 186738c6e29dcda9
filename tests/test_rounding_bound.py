"""Samples whose positions' gradient terms cancel cannot add more than R through rounding
(``fx_bk/kernels/rounding_bound.py``).

The construction: two positions, ``a_1 = a_2 = x`` (or the same token twice) and output gradients
``g_1 = v``, ``g_2 = -v + eps w``, so ``G_i = eps w x^T`` while the ghost norm's terms are
``||x||^2 ||v||^2``. In float32 the ghost norm's rounding error is then of the size of
``||G_i||^2``: unguarded, the computed norm comes out near zero for some samples and their clipped
contribution is several R; guarded, every contribution is at most R. Each test runs both, so it
fails if the construction stops exercising the cancellation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_bk
import fx_bk.kernels.ghost_norm as ghost_norm_module
import fx_bk.rules.conv as conv_rules
import fx_bk.rules.embedding as embedding_rules
import fx_bk.rules.tied as tied_rules
from fx_bk.kernels.clipped_gemm import clipped_gemm
from fx_bk.kernels.ghost_norm import ghost_norm, ghost_norm_blocked
from fx_bk.kernels.rounding_bound import (
    A_POSTERIORI_POSITIONS,
    KEPT_REL_ERROR,
    TAU,
    error_constant,
    guard_norm_sq,
    unit_roundoff,
)
from fx_bk.site import Strategy

R = 1.0
EPS = 3e-4  # the cancellation: ||G|| / sum_t ||g_t a_t^T|| about 1.5e-4


def _cancelling(n: int, d: int, p: int, seed: int, scale: float | None = None):
    """``n`` samples of two positions: ``a [n, 2, d]``, ``g [n, 2, p]`` as in the module doc;
    by default ``||G_i||`` near 3 R."""
    gen = torch.Generator().manual_seed(seed)
    scale = 3 * R / (EPS * (d * p) ** 0.5) if scale is None else scale
    x = torch.randn(n, 1, d, generator=gen) * scale
    v, w = torch.randn(n, 1, p, generator=gen), torch.randn(n, 1, p, generator=gen)
    return torch.cat([x, x], 1), torch.cat([v, -v + EPS * w], 1)


def _no_guard(norm_sq, *args, **kwargs):
    return norm_sq


def _contributions(norm_sq: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each sample's clipped contribution through the clipped GEMM, in units of R."""
    c = (R / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)
    c = torch.where(torch.isfinite(c), c, 0.0)
    return torch.stack([clipped_gemm(a[i:i + 1], g[i:i + 1], c[i:i + 1], False).norm()
                        for i in range(a.shape[0])]) / R


def _true_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||G_i||`` in float64 for samples whose two positions share ``a``."""
    return g.double().sum(1).norm(dim=-1) * a[:, 0].double().norm(dim=-1)


@pytest.mark.parametrize("d,p", [(768, 768), (16, 4096)])
def test_ghost_norm_op_bounds_cancelling_samples(d, p):
    a, g = _cancelling(256, d, p, seed=d + p)
    raw = _contributions(ghost_norm_blocked(a, g), a, g)
    assert raw.max() > 1.2, raw.max()  # the unguarded norm lets a sample add more than R
    guarded = _contributions(ghost_norm(a, g), a, g)
    assert guarded.max() <= 1 + 1e-6, guarded.max()
    # recomputed, not merely bounded: a sample above R adds R within the GEMM term (S / ||G||
    # is about 6000 here, so K u S / ||G|| is about 6e-3)
    over = _true_norms(a, g) > 1.1 * R
    assert over.sum() > 100 and guarded[over].min() > 0.99, guarded[over].min()
    # the same samples scaled up: unguarded contributions grow with the activations
    a_big = a * 100
    assert _contributions(ghost_norm_blocked(a_big, g), a_big, g).max() > 20
    assert _contributions(ghost_norm(a_big, g), a_big, g).max() <= 1 + 1e-6


def test_ghost_norm_op_bounds_systematic_rounding():
    """Constant vectors: every rounding of a long dot product goes the same way, so the Gram
    error grows with the length (57 u S^2 at 16384, against 4.4 for random vectors)."""
    n, d, p = 32, 16, 16384
    gen = torch.Generator().manual_seed(5)
    x = (1 + torch.rand(n, 1, 1, generator=gen)) * torch.ones(n, 1, d)
    v = (1 + torch.rand(n, 1, 1, generator=gen)) * torch.ones(n, 1, p)
    w = torch.randn(n, 1, p, generator=gen)
    scale = 3 * R / (1e-3 * (d * p) ** 0.5)
    a, g = torch.cat([x, x], 1) * scale, torch.cat([v, -v + 1e-3 * w], 1)
    raw_sq = ghost_norm_blocked(a, g).double()
    true_sq = _true_norms(a, g) ** 2
    s = (a.double().norm(dim=-1) * g.double().norm(dim=-1)).sum(1)
    err = ((raw_sq - true_sq).abs() / (unit_roundoff(torch.float32) * s * s)).max()
    assert err > 32, err  # beyond a constant K: the length matters
    assert _contributions(ghost_norm(a, g), a, g).max() <= 1 + 1e-6


def test_long_uncorrelated_samples_are_kept_by_the_a_posteriori_bound(monkeypatch):
    """From ``A_POSTERIORI_POSITIONS`` positions on, ordinary samples reach the ``S`` test
    (``S / ||G||`` about ``sqrt(T)`` for uncorrelated positions): the Grams' own error bound
    keeps them, so the op returns the float32 blocked norm, not a float64 recomputation; the
    bound holds against float64. Shorter sequences are left to the ``S`` test alone."""
    gen = torch.Generator().manual_seed(11)
    t = 2 * A_POSTERIORI_POSITIONS
    a, g = torch.randn(4, t, 32, generator=gen), torch.randn(4, t, 64, generator=gen)
    norm_sq, bound, error = ghost_norm_module._ghost_blocks(a, g, None, with_error=True)
    assert (norm_sq < TAU * bound * bound).all()  # every sample flagged by the S test alone
    exact = ghost_norm_blocked(a.double(), g.double())
    assert ((norm_sq.double() - exact).abs() <= error.double()).all()
    assert (error.double() < KEPT_REL_ERROR * exact).all()
    calls = []
    blocks = ghost_norm_module._ghost_blocks

    def spy(a, g, block, with_error=False):
        calls.append((a.shape[1], a.dtype, with_error))
        return blocks(a, g, block, with_error)

    monkeypatch.setattr(ghost_norm_module, "_ghost_blocks", spy)
    assert torch.equal(ghost_norm(a, g), norm_sq)  # kept: not recomputed
    ghost_norm(a[:, : A_POSTERIORI_POSITIONS - 1], g[:, : A_POSTERIORI_POSITIONS - 1])
    first = [c for c in calls if c[1] == torch.float32]  # (then float64 recomputations)
    assert first == [(t, torch.float32, True), (A_POSTERIORI_POSITIONS - 1, torch.float32, False)]
    assert calls[1] == first[1]  # nothing recomputed at 2000 positions


def test_recomputation_by_instantiation_bounds_the_norm_where_cheaper():
    """A flagged sample is recomputed from float64 Grams while ``p d >= T (d + p)``, else from
    its float32 gradient plus ``K u S``: an upper bound of the float64 norm within that term."""
    gen = torch.Generator().manual_seed(13)
    a, g = torch.randn(3, 40, 8, generator=gen), torch.randn(3, 40, 6, generator=gen)
    exact = ghost_norm_blocked(a.double(), g.double())
    s = (a.norm(dim=-1) * g.norm(dim=-1)).sum(1)
    got = ghost_norm_module._recomputed_norms(a, g, None, s)  # 48 < 40 * 14: instantiated
    ku_s = error_constant(40) * unit_roundoff(torch.float32) * s.double()
    assert (got >= exact).all() and (got.sqrt() <= exact.sqrt() + 2 * ku_s).all()
    assert not torch.equal(got, exact)
    wide = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 6, generator=gen)
    assert torch.equal(ghost_norm_module._recomputed_norms(*wide, None, None),  # 48 >= 2 * 14
                       ghost_norm_blocked(wide[0].double(), wide[1].double()))


@pytest.mark.parametrize("construction", ["random", "systematic"])
def test_long_cancelling_samples_are_still_bounded(construction):
    """The cancelling constructions at ``A_POSTERIORI_POSITIONS`` positions (the two positions
    of the module doc, then zeros; or constant vectors, whose roundings all go one way): the
    a-posteriori bound flags them as the ``S`` test does, and every contribution stays within
    R, while unguarded ones exceed it. At this length (``p d < T (d + p)``) a flagged sample is
    recomputed from its float32 gradient plus that gradient's rounding ``K u S``: about 3% of
    ``||G_i||`` for these samples (``S / ||G_i||`` near 6000), so they add at least 0.9 R."""
    n, d, p, eps = 32, 16, 256, EPS if construction == "random" else 1e-3
    gen = torch.Generator().manual_seed(12)
    if construction == "random":
        x, v = torch.randn(n, 1, d, generator=gen), torch.randn(n, 1, p, generator=gen)
    else:
        x = (1 + torch.rand(n, 1, 1, generator=gen)) * torch.ones(n, 1, d)
        v = (1 + torch.rand(n, 1, 1, generator=gen)) * torch.ones(n, 1, p)
    w = torch.randn(n, 1, p, generator=gen)
    x = x * 3 * R / (eps * (d * p) ** 0.5)
    a = torch.zeros(n, A_POSTERIORI_POSITIONS, d)
    g = torch.zeros(n, A_POSTERIORI_POSITIONS, p)
    a[:, :2], g[:, :2] = torch.cat([x, x], 1), torch.cat([v, -v + eps * w], 1)
    assert _contributions(ghost_norm_blocked(a, g), a, g).max() > 1.2
    guarded = _contributions(ghost_norm(a, g), a, g)
    assert guarded.max() <= 1 + 1e-6, guarded.max()
    over = _true_norms(a[:, :2], g[:, :2]) > 1.1 * R
    assert over.sum() > 10 and guarded[over].min() > 0.9, guarded[over].min()


def test_guard_leaves_well_conditioned_norms_unchanged():
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(32, 64, 48, generator=gen), torch.randn(32, 64, 40, generator=gen)
    torch.testing.assert_close(ghost_norm(a, g), ghost_norm_blocked(a, g), rtol=0, atol=0)
    a64, g64 = a.double(), g.double()  # float64: the same values, guard at u = 2^-53
    torch.testing.assert_close(ghost_norm(a64, g64), ghost_norm_blocked(a64, g64), rtol=0, atol=0)


def test_guard_is_an_upper_bound_and_keeps_nan():
    s = torch.tensor([10.0, 10.0, 10.0, 0.0, 10.0])
    n2 = torch.tensor([50.0, 1e-3, -1e-3, 0.0, float("nan")])
    out = guard_norm_sq(n2, s, torch.float32, 768)
    ku = error_constant(768) * unit_roundoff(torch.float32)
    assert out[0] == 50.0  # n^2 >= TAU S^2: kept
    assert 1e-3 < TAU * 100
    want = ((1e-3 + ku * 100) ** 0.5 + ku * 10) ** 2
    assert out[1].item() == pytest.approx(want, rel=1e-6)
    assert out[2].item() == pytest.approx((ku ** 0.5 * 10 + ku * 10) ** 2, rel=1e-6)
    assert out[3] == 0.0 and torch.isnan(out[4])


def _per_sample_step(bk, model, x, y) -> float:
    model.zero_grad(set_to_none=True)
    (bk(x) * y).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() / R


def _max_contribution(model, inputs, targets, **transform_kw) -> float:
    """The largest clipped contribution of one sample (batches of one, loss ``<out, y>``)."""
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum", **transform_kw)
    return max(_per_sample_step(bk, model, x[None], y[None]) for x, y in zip(inputs, targets))


def test_linear_site_end_to_end(monkeypatch):
    """A Linear over two positions (the ghost norm), the user's own loss; eager fx_bk."""
    a, g = _cancelling(48, 256, 256, seed=1)
    model = nn.Linear(256, 256, bias=False)
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    _per_sample_step(bk, model, a[:1], g[:1])
    (site,) = [s for s in bk.programs[0].prog.sites if s.rule.name == "linear"]
    assert site.strategy == Strategy.GHOST
    assert max(_per_sample_step(bk, model, x[None], y[None]) for x, y in zip(a, g)) <= 1 + 1e-6
    monkeypatch.setattr(ghost_norm_module, "recompute_cancelling", _no_guard)
    assert _max_contribution(model, a, g) > 1.2


def test_embedding_same_token_end_to_end(monkeypatch):
    """The same token at two positions with nearly opposite output gradients."""
    _, g = _cancelling(48, 1, 512, seed=2, scale=1.0)
    g = g * 3 * R / (EPS * 512 ** 0.5)  # ||G_i|| near 3 R
    tokens = torch.randint(0, 50, (48, 1), generator=torch.Generator().manual_seed(2))
    tokens = tokens.expand(48, 2)
    model = nn.Embedding(50, 512)
    assert _max_contribution(model, tokens, g) <= 1 + 1e-6
    monkeypatch.setattr(embedding_rules, "guard_norm_sq", _no_guard)
    assert _max_contribution(model, tokens, g) > 1.2


def test_conv_position_gram_end_to_end(monkeypatch):
    """A 1-wide convolution over two positions with the same input (the position-Gram norm)."""
    monkeypatch.setattr(conv_rules, "conv_strategy", lambda *args: (Strategy.GHOST_GRAM, 1))
    a, g = _cancelling(48, 256, 256, seed=3)
    x, y = a.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()  # [n, C, 2]
    model = nn.Conv1d(256, 256, 1, bias=False)
    assert _max_contribution(model, x, y) <= 1 + 1e-6
    monkeypatch.setattr(conv_rules, "guard_norm_sq", _no_guard)
    assert _max_contribution(model, x, y) > 1.2


class _TiedPair(nn.Module):
    """One weight as an embedding and as an output projection (the tie handler's cross term)."""

    def __init__(self, vocab: int = 40, d: int = 256):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)

    def forward(self, tokens, z):
        return self.emb(tokens), nn.functional.linear(z, self.emb.weight)


def test_tied_cross_term_end_to_end(monkeypatch):
    """The embedding's row ``x`` gets ``e = -lam a + lam eps w`` and the projection adds
    ``lam a`` at the same row: each part has norm ``lam ||a||``, their sum ``lam eps ||w||``."""
    n, vocab, d = 48, 40, 256
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, vocab, (n, 1), generator=gen)
    a, w = torch.randn(n, 1, d, generator=gen), torch.randn(n, 1, d, generator=gen)
    lam = 3 * R / (EPS * d ** 0.5)  # ||G_i|| near 3 R
    e = lam * (-a + EPS * w)
    logit_grads = torch.zeros(n, 1, vocab).scatter_(2, tokens[:, :, None], lam)

    def max_contribution():
        model = _TiedPair(vocab, d)
        bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
        worst = 0.0
        for i in range(n):
            model.zero_grad(set_to_none=True)
            emb_out, logits = bk(tokens[i:i + 1], a[i:i + 1])
            ((emb_out * e[i:i + 1]).sum() + (logits * logit_grads[i:i + 1]).sum()).backward()
            worst = max(worst, model.emb.weight.grad.norm().item() / R)
        assert bk.programs[0].prog.sites[0].bundle_note == "tie cross term"
        return worst

    assert max_contribution() <= 1 + 1e-6
    monkeypatch.setattr(tied_rules, "guard_norm_sq", _no_guard)
    assert max_contribution() > 1.2
