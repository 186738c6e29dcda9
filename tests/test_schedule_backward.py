"""passes/schedule_backward.py: the backward graph reordered so output gradients die early."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fx_bk
import passes
from fx_bk.testing.models import MODELS, batch_for

schedule = sys.modules["passes.schedule_backward"]  # the module (the package exports the pass)


def _late_norm(x, w):
    g = x @ w  # [B, 256]: an "output gradient"
    a = torch.tanh(g)  # the backward goes on from it ...
    b = torch.cat([a, a], 1).relu()  # ... allocating more
    c = (b @ torch.cat([w, w], 1).t()).sigmoid()
    return c, torch.linalg.vector_norm(g, dim=1)  # the norm reads g last, in program order


def _traced(fn=_late_norm):
    x, w = torch.randn(64, 32, dtype=torch.float64), torch.randn(32, 256, dtype=torch.float64)
    return make_fx(fn)(x, w), (x, w)


def _position(gm, target):
    return next(i for i, n in enumerate(gm.graph.nodes) if n.target is target)


def test_a_shrinking_reader_moves_to_free_its_input_and_computes_the_same():
    gm, inputs = _traced()
    before = copy.deepcopy(gm)
    moved, (peak_before, peak_after) = schedule.schedule_if_lower(gm)
    assert moved > 0
    # the norm now runs right after tanh, the other reader of g, ...
    norm = torch.ops.aten.linalg_vector_norm.default
    assert _position(gm, norm) < _position(gm, torch.ops.aten.cat.default)
    # ... which the modelled peak sees: g [64, 256] dies before the [64, 512] chain runs
    assert peak_after == schedule.peak_bytes(gm) < peak_before == schedule.peak_bytes(before)
    for got, want in zip(gm(*inputs), before(*inputs)):
        assert torch.equal(got, want)


def _norm_of_a_square(x, w):
    g = x @ w
    a = torch.tanh(g)
    b = a @ w.t()  # smaller than g: g's early death saves less than the square costs at tanh
    return b, (g * g).sum(1)


def test_a_reorder_that_raises_the_modelled_peak_is_undone():
    gm, inputs = _traced(_norm_of_a_square)
    order = [n.name for n in gm.graph.nodes]
    probe = copy.deepcopy(gm)
    assert schedule.schedule_early(probe) > 0  # the sweep alone moves the square next to tanh
    assert schedule.peak_bytes(probe) > schedule.peak_bytes(gm)
    moved, (before, after) = schedule.schedule_if_lower(gm)
    assert (moved, after) == (0, before)
    assert [n.name for n in gm.graph.nodes] == order
    gm(*inputs)  # still runs


def test_nodes_after_the_given_node_stay():
    gm, _ = _traced()
    order = [n.name for n in gm.graph.nodes]
    g = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    assert schedule.schedule_early(gm, after=g) == 0  # everything reading g depends on it
    assert [n.name for n in gm.graph.nodes] == order


def test_a_reader_of_a_storage_read_again_later_does_not_move():
    def f(x, w):
        g = x @ w
        a = torch.tanh(g)
        n1 = (g * g).sum(1)  # shrinks, but g is read again below: moving it frees nothing
        return a, n1, g.exp()

    x, w = torch.randn(8, 4), torch.randn(4, 16)
    gm = make_fx(f)(x, w)
    names = [n.name for n in gm.graph.nodes]
    schedule.schedule_early(gm)
    assert [n.name for n in gm.graph.nodes].index("mul") == names.index("mul")


BUILD_PASSES = passes.BUILD_PASSES


def _clipped(model, x, y, scheduled: bool, monkeypatch):
    monkeypatch.setattr(passes, "BUILD_PASSES", BUILD_PASSES if scheduled else tuple(
        p for p in BUILD_PASSES if p is not passes.schedule_backward))
    bk = fx_bk.transform(copy.deepcopy(model), max_grad_norm=0.1)
    torch.nn.functional.cross_entropy(bk(x), y).backward()
    grads = {n: p.grad for n, p in bk.named_parameters()}
    return grads, bk.programs[0].prog


@pytest.mark.parametrize("name", ["resnet_gn", "transformer"])
def test_the_scheduled_backward_gives_the_same_clipped_gradients_with_a_lower_peak(
        name, monkeypatch):
    """The order changes, the arithmetic does not: every clipped gradient is bitwise the one of
    the unscheduled backward. On the CNN (instantiated per-sample convolution gradients, GroupNorm
    per-sample gradients) the modelled peak drops."""
    torch.manual_seed(0)
    model = MODELS[name]()
    x, y = batch_for(name, model, 16, seed=1)
    plain, prog_plain = _clipped(model, x, y, False, monkeypatch)
    scheduled, prog = _clipped(model, x, y, True, monkeypatch)
    assert prog.backward_moves > 0 and prog_plain.backward_moves == 0
    for n, grad in plain.items():
        assert torch.equal(scheduled[n], grad), n
    before, after = prog.backward_peaks
    assert before == schedule.peak_bytes(prog_plain.bw_graph)
    assert after <= before
    if name == "resnet_gn":
        assert after < before
