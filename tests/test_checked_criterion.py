"""``fx_bk.checked_criterion``: the loss computed outside the module, proven like the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.criterion import CheckedCriterion
from fx_bk.testing import loop_clipped_sum

R = 0.5


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_checked_criterion_gives_the_exact_clipped_sum(reduction, compiled):
    model = _model()
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction=reduction)
    criterion = fx_bk.checked_criterion(nn.CrossEntropyLoss(reduction=reduction), reduction)
    run = torch.compile(bk) if compiled else bk
    for b in (5, 3):  # one proof serves every batch size
        x, y = torch.randn(b, 4, dtype=torch.float64), torch.randint(0, 3, (b,))
        model.zero_grad()
        criterion(run(x), y).backward()
        want = loop_clipped_sum(model, (x, y), None, R, loss_of=lambda m, xy: F.cross_entropy(
            m(xy[0]), xy[1], reduction="sum"))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("criterion,match", [
    (lambda o, t: F.cross_entropy(o, t, reduction="sum"), r"pass loss_reduction='sum'"),
    (lambda o, t: F.cross_entropy(o - o.mean(0), t), r"mixes-samples.*aten.mean"),
    (lambda o, t: F.cross_entropy(o, t) * o.shape[0] / o.detach().abs().sum(),
     r"mixes-samples"),
    (lambda o, t: F.cross_entropy(o, t, reduction="none"), r"criterion-not-reduced"),
], ids=["sum-as-mean", "centered-logits", "divided-by-a-batch-statistic", "not-reduced"])
def test_unchecked_ways_of_coupling_are_rejected(criterion, match):
    bk = fx_bk.transform(_model(), max_grad_norm=R)
    out = bk(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(fx_bk.UnsupportedModelError, match=match):
        fx_bk.checked_criterion(criterion)(out, torch.randint(0, 3, (4,)))


def test_token_mean_criterion_checks_label_counts_on_every_call():
    criterion = fx_bk.checked_criterion(
        lambda logits, labels: F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    logits = torch.randn(3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 5, (3, 4))
    criterion(logits, labels).backward()
    labels[1, 2:] = -100
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"\[4, 2, 4\]"):
        criterion(logits, labels)


def test_make_private_returns_the_checked_criterion():
    from torch.utils.data import DataLoader, TensorDataset

    model = _model().float()
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    module, opt, criterion, loader = fx_bk.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=0.5, max_grad_norm=R,
        criterion=nn.CrossEntropyLoss())
    assert isinstance(criterion, CheckedCriterion) and criterion.criterion is not None
    x, y = next(iter(loader))
    opt.zero_grad()
    criterion(module(x), y).backward()
    opt.step()
