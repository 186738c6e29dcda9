"""Fused RNNs (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) traced as their cells
(``fx_bk/recurrent.py``): exact against the per-sample loop, every option combination."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fx_bk
from fx_bk.testing import assert_matches_per_sample


class Tagger(nn.Module):
    """A recurrent layer and a Linear head on its outputs, mean over time."""

    def __init__(self, cls, **kw):
        super().__init__()
        self.rnn = cls(4, 5, **kw)
        width = kw.get("proj_size") or 5
        self.head = nn.Linear(width * (2 if kw.get("bidirectional") else 1), 3)
        self.batch_first = kw.get("batch_first", False)

    def forward(self, x):  # x: [B, T, 4]
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head(out if self.batch_first else out.transpose(0, 1)).mean(1)


CASES = [
    (nn.LSTM, dict(batch_first=True)),
    (nn.LSTM, dict(num_layers=2, bidirectional=True)),
    (nn.LSTM, dict(proj_size=3, batch_first=True)),
    (nn.GRU, dict(batch_first=True, num_layers=2)),
    (nn.GRU, dict(bias=False)),
    (nn.RNN, dict(bidirectional=True, batch_first=True)),
    (nn.RNN, dict(nonlinearity="relu")),
]


def _err(cls, kw, dtype, compiled=False, batch=4, reduction="sum"):
    torch.manual_seed(0)
    model = Tagger(cls, **kw).to(dtype)
    x = torch.randn(batch, 6, 4, dtype=dtype)
    if compiled:
        torch._dynamo.reset()

    def loss(out, _):
        per_sample = out.pow(2).sum(1)
        return per_sample.sum() if reduction == "sum" else per_sample.mean()

    return assert_matches_per_sample(model, loss, (x, None), max_grad_norm=0.05,
                                     loss_reduction=reduction, compile=compiled, tol=1.0)


@pytest.mark.parametrize("cls, kw", CASES, ids=[f"{c.__name__}-{k}" for c, k in CASES])
def test_recurrent_layers_are_exact(cls, kw):
    assert _err(cls, kw, torch.float64) <= 1e-12


def test_lstm_compiled_float32_and_mean_reduction():
    """Dynamo refuses RNN modules unless ``allow_rnn`` (torch's own switch, for any RNN under
    torch.compile); with it, one graph, exact."""
    with torch._dynamo.config.patch(allow_rnn=True):
        assert _err(nn.LSTM, dict(batch_first=True, num_layers=2), torch.float32,
                    compiled=True) <= 2e-5
    assert _err(nn.GRU, dict(batch_first=True), torch.float64, batch=1,
                reduction="mean") <= 1e-12


def test_hidden_weight_is_one_merged_linear_bundle():
    """The T hidden projections of W_hh are one bundle: one norm term with cross terms."""
    model = Tagger(nn.LSTM, batch_first=True)
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    bk(torch.randn(2, 6, 4))
    prog = bk.programs[-1].prog
    hh = [s for s in prog.sites if "rnn.weight_hh_l0" in s.params.values()]
    assert len(hh) == 6
    bundles = [b for b in prog.bundles if set(b.sites) & {prog.sites.index(s) for s in hh}]
    assert len(bundles) == 1 and len(bundles[0].sites) == 6


def test_eval_without_grad_keeps_the_fused_op():
    model = Tagger(nn.GRU, batch_first=True).eval()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    x = torch.randn(3, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(bk(x), model(x))


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.head(out.sum(1))


def test_packed_sequences_are_rejected_naming_the_line():
    bk = fx_bk.transform(Packed(), max_grad_norm=1.0)
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"trace-failed.*in forward"):
        bk(torch.randn(3, 6, 4), torch.tensor([6, 4, 2]))
