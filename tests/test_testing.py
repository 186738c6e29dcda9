"""``fx_bk.testing.assert_matches_per_sample``: the one-call check users run on their model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk.testing
from fx_bk.testing.models import MLP, TransformerStyle


class TwoInputs(nn.Module):
    """``forward(x, mask)``: two batched positional inputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, mask):  # [B, T, 4], [B, T]
        h = torch.tanh(self.fc(x)) * mask.unsqueeze(-1)
        return self.head(h.sum(1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clipping", ["abadi", "automatic", "global"])
def test_mlp_matches_for_every_reduction_and_clipping(reduction, clipping):
    torch.manual_seed(0)
    model = MLP().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,))

    def loss(out, target):
        return F.cross_entropy(out, target, reduction=reduction)

    err = fx_bk.testing.assert_matches_per_sample(
        model, loss, (x, y), max_grad_norm=0.1, loss_reduction=reduction, clipping=clipping)
    assert err <= 1e-10


def test_tuple_inputs_and_a_loss_without_target():
    torch.manual_seed(0)
    model = TwoInputs().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    mask = (torch.rand(5, 3) > 0.3).double()
    err = fx_bk.testing.assert_matches_per_sample(
        model, lambda out, _: out.pow(2).sum(1).mean(), ((x, mask), None), max_grad_norm=0.5)
    assert err <= 1e-10


def test_compiled_float32_transformer():
    torch.manual_seed(0)
    model = TransformerStyle()
    x = torch.randint(0, 13, (4, 6))
    x[:2, -2:] = 0  # padding tokens: excluded from the embedding's norm
    err = fx_bk.testing.assert_matches_per_sample(
        model, F.cross_entropy, (x, torch.randint(0, 5, (4,))), max_grad_norm=0.05,
        compile=True)
    assert err <= 1e-5
    assert all(p.grad is not None for p in model.parameters())  # fx_bk's grads are left
