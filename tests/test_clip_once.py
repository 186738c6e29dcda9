"""One clip per sample per step: two forward calls feeding one backward, or a second backward
through one forward, are errors (each would add a sample's clipped gradient twice: 2R);
sequential accumulation is not."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk

COMPILED = [False, True]


def _setup(compiled: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    fwd = torch.compile(bk, fullgraph=True) if compiled else bk
    g = torch.Generator().manual_seed(1)
    return model, fwd, torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("compiled", COMPILED, ids=["eager", "compiled"])
def test_two_forward_calls_in_one_backward_are_an_error(compiled):
    model, fwd, x, y = _setup(compiled)
    with pytest.raises(fx_bk.ClipOnceError, match="two forward calls of the same fx_bk module"):
        (F.cross_entropy(fwd(x), y) + F.cross_entropy(fwd(2 * x), y)).backward()
    with pytest.raises(fx_bk.ClipOnceError, match="two forward calls"):
        torch.autograd.backward([fwd(x).sum(), fwd(x).sum()])
    model.zero_grad()
    F.cross_entropy(fwd(x), y).backward()  # the next step is fine
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("compiled", COMPILED, ids=["eager", "compiled"])
def test_sequential_accumulation_is_allowed(compiled):
    model, fwd, x, y = _setup(compiled)
    F.cross_entropy(fwd(x[:2]), y[:2], reduction="sum").backward()
    first = _grads(model)
    F.cross_entropy(fwd(x[2:]), y[2:], reduction="sum").backward()
    total = _grads(model)
    model.zero_grad()
    F.cross_entropy(fwd(x[2:]), y[2:], reduction="sum").backward()
    for a, b, c in zip(first, _grads(model), total):
        torch.testing.assert_close(a + b, c)


@pytest.mark.parametrize("compiled", COMPILED, ids=["eager", "compiled"])
def test_a_second_backward_through_one_forward_is_an_error(compiled):
    # compiled, PyTorch refuses a second backward itself where the backward donates buffers;
    # without donation (this config, or a graph with nothing to donate) fx_bk's guard does.
    # config.patch, not monkeypatch.setattr: pytest 9.2 does not see a config module's
    # attributes and, undoing, deletes the option for every later compile
    with torch._functorch.config.patch(donated_buffer=False):
        model, fwd, x, y = _setup(compiled)
        out = fwd(x)
        F.cross_entropy(out, y).backward(retain_graph=True)
        with pytest.raises(fx_bk.ClipOnceError, match="second backward pass through the same"):
            out.sum().backward()
        model.zero_grad()
        F.cross_entropy(fwd(x), y).backward()
