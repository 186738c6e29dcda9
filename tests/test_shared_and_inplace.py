"""Shared parameters across rules, and in-place ops that touch a site's tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.testing import assert_matches_per_sample, fx_bk_grads, max_rel_err, vmap_clipped_sum


class TiedLM(nn.Module):
    """Embedding and output projection share one [V, d] weight (GPT-2 style)."""

    def __init__(self, vocab=64, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):  # [B, T] -> [B, V]
        h = torch.tanh(self.mix(self.emb(x)))  # [B, T, d]
        return self.out(h).mean(1)


class InPlace(nn.Module):
    """In-place ops on Linear outputs: ReLU(inplace=True), ``+=`` on a view, ``mul_``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act(self.fc1(x))  # fc1's output is mutated by the ReLU
        y = self.fc2(h)
        y[:, :4] += 1.0  # a view of fc2's output, mutated
        y.mul_(2.0)
        return self.fc3(torch.tanh(y))


def test_tied_embedding_and_linear_exact():
    model = TiedLM().double()
    bk = fx_bk.transform(model, max_grad_norm=0.05)
    for b in (1, 5):
        x = torch.randint(0, 64, (b, 4))
        x[0, :2] = 7  # a repeated token
        y = torch.randint(0, 64, (b,))
        got = fx_bk_grads(bk, model, x, y, "mean")
        assert set(got) == {"emb.weight", "mix.weight", "mix.bias"}
        assert max_rel_err(got, vmap_clipped_sum(model, x, y, 0.05)) <= 1e-10
    (compiled,) = bk.programs
    tied = [s for s in compiled.prog.sites if s.params.get("weight") == "emb.weight"]
    assert [s.bundle_note for s in tied] == ["tie cross term"] * 2
    assert {s.strategy for s in tied} == {"ghost"}  # V = 64 >> T = 4
    # no [B, V, d] per-sample gradient anywhere in the joint graph
    for node in compiled.prog.joint_graph.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 3:
            assert tuple(val.shape[1:]) != (64, 6), node


def test_inplace_ops_after_sites_exact():
    model = InPlace().double()
    bk = fx_bk.transform(model, max_grad_norm=0.3, loss_reduction="sum")
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = fx_bk_grads(bk, model, x, y, "sum")
    assert max_rel_err(got, vmap_clipped_sum(model, x, y, 0.3)) <= 1e-10


def test_dynamic_true_new_sequence_length_retraces():
    from fx_bk.testing.models import TransformerStyle

    model = TransformerStyle()
    compiled = torch.compile(fx_bk.transform(model, max_grad_norm=0.5), dynamic=True,
                             fullgraph=True)
    for b, t in ((4, 7), (6, 5), (3, 7)):
        x, y = torch.randint(1, 13, (b, t)), torch.randint(0, 5, (b,))
        got = fx_bk_grads(compiled, model, x, y, "mean")
        assert max_rel_err(got, vmap_clipped_sum(model, x, y, 0.5)) <= 1e-5
        F.cross_entropy(compiled(x), y)  # outputs usable as well


class BroadcastPositions(nn.Module):
    """Positional lookups broadcast over the batch: ``pos(arange(T))`` ([T, d]) and
    ``pos2(position_ids)`` with ``position_ids: [1, T]`` (Hugging Face style), through ``.to``."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, 4)
        self.pos2 = nn.Embedding(8, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # [B, T, 4]
        t = torch.arange(x.shape[1])
        h = x + self.pos(t)
        h = h * self.pos2(t.unsqueeze(0)).to(x.device)
        return self.fc(h).sum(1)


def test_sites_broadcast_over_the_batch_get_per_sample_gradients():
    model = BroadcastPositions().double()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    for b in (1, 8):  # 8 == T
        x, y = torch.randn(b, 8, 4, dtype=torch.float64), torch.randint(0, 3, (b,))
        got = fx_bk_grads(bk, model, x, y, "mean")
        assert max_rel_err(got, vmap_clipped_sum(model, x, y, 0.1)) <= 1e-10
    indices = [s.shapes["indices"] for s in bk.programs[0].prog.sites if s.rule.name == "embedding"]
    assert indices == [("B", 8), ("B", 8)]


class MHA(nn.Module):
    """``nn.MultiheadAttention``: packed in_proj on ``[T, B, d]``, out_proj on ``[T*B, d]``."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 8]
        h = x if self.batch_first else x.transpose(0, 1)
        o, _ = self.mha(h, h, h, need_weights=False)
        o = o if self.batch_first else o.transpose(0, 1)
        return self.head(o.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_multihead_attention(batch_first, compiled):
    model = MHA(batch_first) if compiled else MHA(batch_first).double()
    dtype = next(model.parameters()).dtype
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    if compiled:
        bk = torch.compile(bk, fullgraph=True)
    for b in (1, 5):
        x, y = torch.randn(b, 6, 8, dtype=dtype), torch.randint(0, 3, (b,))
        got = fx_bk_grads(bk, model, x, y, "mean")
        err = max_rel_err(got, vmap_clipped_sum(model, x, y, 0.1))
        assert err <= (1e-5 if compiled else 1e-10), err


class InPlaceParameterOps(nn.Module):
    """``h += self.bias`` and ``h.mul_(self.scale)`` on an activation that another name
    aliases (ConvBERT adds its bias this way): the in-place ops are sites of the broadcast
    rules; the Linear output they update is kept intact for the Linear's own rule."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(4))
        self.scale = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        alias = h
        h += self.bias
        h.mul_(self.scale)
        return self.out(h + alias).sum(1)


def test_in_place_parameter_ops_on_activations_are_exact():
    torch.manual_seed(0)
    model = InPlaceParameterOps().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    for norm in (1e9, 0.05):
        assert_matches_per_sample(model, lambda out, _: out.pow(2).sum(), (x, None),
                                  max_grad_norm=norm, loss_reduction="sum", tol=1e-12)


class ViewUpdatedBetweenLinears(nn.Module):
    """``h[..., :2].mul_(2)``: the second Linear reads the updated ``h`` through its base, the
    first Linear's output must stay as it was. (Both were read as the un-updated value.)"""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        h[..., :2].mul_(2.0)
        return self.out(h).sum(1)


class ParameterAddedIntoAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        self.b = nn.Parameter(torch.randn(2))

    def forward(self, x):
        h = self.lin(x)
        h[..., :2] += self.b
        return self.out(h).sum(1)


def test_update_through_a_view_between_sites_is_exact():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    assert_matches_per_sample(
        ViewUpdatedBetweenLinears().double(), lambda out, _: out.pow(2).sum(), (x, None),
        max_grad_norm=0.05, loss_reduction="sum", tol=1e-12)


def test_parameter_added_in_place_into_a_view_is_rejected():
    bk = fx_bk.transform(ParameterAddedIntoAView(), max_grad_norm=1.0)
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"aten\.add_.*'b'.*out of place"):
        bk(torch.randn(3, 5, 4))
