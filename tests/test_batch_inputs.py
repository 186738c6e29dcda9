"""Which inputs carry the batch: declared with ``unbatched=``, never guessed from a size
coincidence (fx_bk/batch_inputs.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.testing import loop_clipped_sum

R = 0.4


class Mixer(nn.Module):
    """``T: [3, 3]`` is a table shared by all samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, T):
        return self.fc(x) @ T


class TwoOutputs(Mixer):
    def forward(self, x, w):
        return self.fc(x), w * 2


def test_a_shared_input_the_size_of_the_batch_is_rejected_with_the_fix():
    """At batch 3, T's dim 0 equals the batch size: taken as batched, ``h @ T`` contracts over
    the batch; the error names the way out."""
    x, T = torch.randn(3, 4), torch.randn(3, 3)
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"unbatched=\['<argument>'\]"):
        fx_bk.transform(Mixer(), max_grad_norm=R)(x, T)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_declared_unbatched_input_is_shared_at_every_batch_size(compiled):
    torch.manual_seed(0)
    model = Mixer().double()
    T = torch.randn(3, 3, dtype=torch.float64)
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum", unbatched=["T"])
    run = torch.compile(bk) if compiled else bk
    for b in (3, 5):
        x, y = torch.randn(b, 4, dtype=torch.float64), torch.randint(0, 3, (b,))
        model.zero_grad()
        F.cross_entropy(run(x, T), y, reduction="sum").backward()
        want = loop_clipped_sum(model, (x, y), None, R, loss_of=lambda m, xy: F.cross_entropy(
            m(xy[0], T), xy[1], reduction="sum"))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-12)


def test_an_argument_that_changes_sides_between_calls_is_an_error():
    """``w`` ([4]) is taken as batched at batch 4 (nothing tells it apart), not at batch 6:
    fx_bk refuses to guess and asks for the declaration."""
    bk = fx_bk.transform(TwoOutputs(), max_grad_norm=R)
    w = torch.ones(4)
    bk(torch.randn(4, 4), w)[0].sum().backward()
    with pytest.raises(fx_bk.UnsupportedModelError,
                       match=r"ambiguous-batch-input.*'w'.*unbatched=\['w'\]"):
        bk(torch.randn(6, 4), w)
    declared = fx_bk.transform(TwoOutputs(), max_grad_norm=R, unbatched=["w"])
    for b in (4, 6):
        declared(torch.randn(b, 4), w)[0].sum().backward()


def test_unbatched_names_must_be_forward_arguments():
    with pytest.raises(fx_bk.ConfigError, match=r"unbatched names \['q'\]"):
        fx_bk.transform(Mixer(), max_grad_norm=R, unbatched=["q"])
