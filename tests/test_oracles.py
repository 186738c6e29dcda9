"""fx_bk vs the explicit per-sample (vmap) oracle and vs Opacus 1.6 ghost clipping."""

from __future__ import annotations

import pytest
import torch

import fx_bk
from fx_bk.testing import fx_bk_grads, max_rel_err, opacus_clipped_sum, vmap_clipped_sum
from fx_bk.testing.models import MODELS, OPACUS_MODELS, batch_for

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
BATCHES = (1, 7, 32)
# so small that every sample is clipped, so large that none is
NORMS = (1e-3, 1e3)


def _check_against_vmap(bk, model, name, dtype, reduction, norm):
    worst = 0.0
    for b in BATCHES:
        x, y = batch_for(name, model, b, seed=b, dtype=dtype)
        got = fx_bk_grads(bk, model, x, y, reduction)
        err = max_rel_err(got, vmap_clipped_sum(model, x, y, norm))
        assert err <= TOL[dtype], f"{name} {dtype} {reduction} R={norm} B={b}: rel err {err:.2e}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_eager_matches_vmap_oracle(name, dtype, reduction, norm):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    bk = fx_bk.transform(model, max_grad_norm=norm, loss_reduction=reduction)
    _check_against_vmap(bk, model, name, dtype, reduction, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_matches_vmap_oracle(name, reduction, norm):
    torch.manual_seed(0)
    model = MODELS[name]()
    bk = torch.compile(
        fx_bk.transform(model, max_grad_norm=norm, loss_reduction=reduction), fullgraph=True
    )
    _check_against_vmap(bk, model, name, torch.float32, reduction, norm)


def test_compiled_f64_transformer_matches_vmap_oracle():
    torch.manual_seed(0)
    model = MODELS["transformer"]().double()
    bk = torch.compile(fx_bk.transform(model, max_grad_norm=0.05), fullgraph=True)
    _check_against_vmap(bk, model, "transformer", torch.float64, "mean", 0.05)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", OPACUS_MODELS)
def test_matches_opacus_ghost_clipping(name, dtype, reduction, norm):
    """Opacus counts padding_idx positions in its Embedding norm, so no padding tokens here."""
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    bk = fx_bk.transform(model, max_grad_norm=norm, loss_reduction=reduction)
    for b in BATCHES:
        x, y = batch_for(name, model, b, seed=b, dtype=dtype, padding=False)
        got = fx_bk_grads(bk, model, x, y, reduction)
        ref = opacus_clipped_sum(model, x, y, norm, reduction)
        err = max_rel_err(got, ref)
        assert err <= TOL[dtype], f"{name} {dtype} {reduction} R={norm} B={b}: rel err {err:.2e}"


def test_oracles_agree_and_opacus_miscounts_padding():
    """The vmap oracle and Opacus agree without padding; with padding Opacus is off."""
    torch.manual_seed(0)
    model = MODELS["transformer"]().double()
    x, y = batch_for("transformer", model, 8, seed=3, dtype=torch.float64, padding=False)
    assert max_rel_err(opacus_clipped_sum(model, x, y, 0.01, "mean"),
                       vmap_clipped_sum(model, x, y, 0.01)) <= 1e-10
    x, y = batch_for("transformer", model, 8, seed=3, dtype=torch.float64, padding=True)
    ref = vmap_clipped_sum(model, x, y, 0.01)
    bk = fx_bk.transform(model, max_grad_norm=0.01)
    assert max_rel_err(fx_bk_grads(bk, model, x, y, "mean"), ref) <= 1e-10
    assert max_rel_err(opacus_clipped_sum(model, x, y, 0.01, "mean"), ref) > 1e-6
