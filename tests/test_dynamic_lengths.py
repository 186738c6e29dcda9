"""Sequence lengths that vary per call: one symbolic trace serves them all, exact at each.

The per-sample oracle is the loop of ``fx_bk.testing.oracles`` (one forward and backward per
sample), float64, at every length. Compile counts use Dynamo's frame counter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import fx_bk
from fx_bk.cost_model import max_ghost_positions
from fx_bk.errors import ConfigError
from fx_bk.site import Strategy
from fx_bk.testing.oracles import loop_clipped_sum, max_rel_err, trainable

V, R = 64, 0.5


def _llama(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(dtype).eval()


def _gpt2(dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=1024)
    return GPT2LMHeadModel(config).to(dtype).eval()  # Conv1D: rows folded as [B*T, d]


class Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(input_ids=ids, attention_mask=mask).logits


def _per_sample(logits, ids):
    """Each sample's mean next-token loss (a per-sample loss, whatever the padding)."""
    return fx_bk.sequence_cross_entropy(logits, ids, shift=True)


def _batch(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - t // 4:] = 0  # one padded sample
    return ids, mask


def _check(bk, model, ids, mask, tol):
    model.zero_grad(set_to_none=True)
    _per_sample(bk(ids, mask), ids).sum().backward()
    got = {n: p.grad.clone() for n, p in trainable(model)}
    ref = loop_clipped_sum(model, (ids, mask), None, R,
                           loss_of=lambda m, xi: _per_sample(m(*xi), xi[0]).sum())
    err = max_rel_err(got, ref)
    assert err <= tol, (tuple(ids.shape), err)


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_lengths_share_one_symbolic_trace(build):
    """Automatic: the first length is traced as it is, the second makes the length symbolic;
    every later length reuses that trace. Exact (float64) at every length."""
    model = Logits(build())
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    for i, t in enumerate((8, 13, 40, 5, 96)):
        _check(bk, model, *_batch(3 + i % 2, t, seed=t), tol=1e-10)
    assert len(bk.programs) == 2
    dynamic = bk.programs[-1].prog.inputs[0].dynamic
    assert dynamic == ((1, "L0"),)


def test_declared_dynamic_traces_once():
    model = Logits(_llama())
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum",
                         dynamic={"ids": 1, "mask": 1})
    for t in (8, 21, 3):
        _check(bk, model, *_batch(3, t, seed=t), tol=1e-10)
    assert len(bk.programs) == 1


def test_mark_dynamic_traces_once():
    model = Logits(_llama())
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    for t in (8, 21):
        ids, mask = _batch(3, t, seed=t)
        torch._dynamo.mark_dynamic(ids, 1)
        torch._dynamo.mark_dynamic(mask, 1)
        _check(bk, model, ids, mask, tol=1e-10)
    assert len(bk.programs) == 1


def test_dynamic_false_traces_per_length():
    model = Logits(_llama())
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum", dynamic=False)
    for t in (8, 12, 8):
        _check(bk, model, *_batch(3, t, seed=t), tol=1e-10)
    assert len(bk.programs) == 2
    assert all(not m.dynamic for p in bk.programs for m in p.prog.inputs)


def test_twenty_lengths_compiled_at_most_two_compiles():
    """The issue's sweep: 20 lengths in [8, 512] and three batch sizes, compiled with Inductor:
    at most two Dynamo compiles (Dynamo's own automatic dynamic) and two BK traces; float32
    exact against the loop at five of the lengths (both ends included)."""
    torch.set_num_threads(2)
    model = Logits(_llama(torch.float32))
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(bk, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    lengths = [8, 512, *torch.randint(9, 512, (18,), generator=g).tolist()]
    for i, t in enumerate(lengths):
        ids, mask = _batch(2 + i % 3, t, seed=i)
        if i in (0, 1, 2, 10, 19):
            _check(compiled, model, ids, mask, tol=2e-5)
        else:
            _per_sample(compiled(ids, mask), ids).sum().backward()
    assert counter.frame_count <= 2, counter.frame_count
    assert len(bk.programs) <= 2


class TwoLinears(nn.Module):
    """Linear sites whose ghost/instantiate choice flips inside the tested lengths."""

    def __init__(self, d=24, p=24):
        super().__init__()
        self.a, self.b = nn.Linear(d, p), nn.Linear(p, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_strategy_by_length_takes_both_branches(compile):
    """A dynamic length makes the GEMM sites choose ghost or instantiation per call
    (``Strategy.BY_LENGTH``: one op of the backward graph chooses on the concrete T); both
    branches are exact."""
    model = TwoLinears().double()
    threshold = max_ghost_positions(24, 24)
    assert 4 < threshold < 200, threshold
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum", dynamic={"x": 1})
    run = torch.compile(bk, fullgraph=True) if compile else bk
    for t in (2, threshold, threshold + 1, 3 * threshold):
        x = torch.randn(4, t, 24, dtype=torch.float64)
        y = torch.randint(0, 3, (4,))
        _check_rows(run, model, x, y)
    prog = bk.programs[0].prog
    assert len(bk.programs) == 1
    assert {str(s.strategy) for s in prog.sites if "a.weight" in s.params.values()} == \
        {str(Strategy.BY_LENGTH)}
    chooser = torch.ops.fx_bk.gemm_norm_by_length.default
    assert any(n.target is chooser for n in prog.bw_graph.graph.nodes)


def _check_rows(bk, model, x, y):
    """One step of ``bk`` (class targets ``y``, summed cross entropy) against the loop,
    float64."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(bk(x), y, reduction="sum").backward()
    got = {n: p.grad.clone() for n, p in trainable(model)}
    ref = loop_clipped_sum(model, x, None, R, loss_of=_row_loss(y))
    assert max_rel_err(got, ref) <= 1e-10, tuple(x.shape)


def _row_loss(y):
    rows = iter(range(len(y)))

    def loss_of(m, xi):
        i = next(rows)
        return F.cross_entropy(m(xi), y[i : i + 1], reduction="sum")

    return loss_of


class BranchesOnLength(nn.Module):
    """A forward that branches on the length: a guard of the symbolic trace."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.lin(x)
        if x.shape[1] > 10:
            h = torch.tanh(h) * 2
        return self.out(h).sum(1)


def test_branch_on_length_is_guarded():
    model = BranchesOnLength().double()
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    y = torch.tensor([0, 1, 1])
    for t in (4, 6, 12, 3, 20):
        x = torch.randn(3, t, 6, dtype=torch.float64)
        _check_rows(bk, model, x, y)
    guards = [str(g.expr) for p in bk.programs for g in p.prog.size_guards]
    assert any(">" in g or "<" in g for g in guards), guards
    assert len(bk.programs) == 3  # T=4 as traced, then symbolic T <= 10 and T > 10


class RefusesSymbolicLength(nn.Module):
    """Stands for a forward that only traces with concrete lengths."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 2)

    def forward(self, x):
        if isinstance(x.shape[1], torch.SymInt):
            raise TypeError("this layer needs a concrete length")
        return self.lin(x).sum(1)


def test_symbolic_trace_failure_falls_back_to_per_length_traces():
    model = RefusesSymbolicLength().double()
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    y = torch.tensor([0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in (3, 4, 7):
            x = torch.randn(2, t, 5, dtype=torch.float64)
            _check_rows(bk, model, x, y)
    assert len(bk.programs) == 3
    assert sum("symbolic sequence length" in str(w.message) for w in caught) == 1


def test_checked_criterion_proves_once_for_every_length():
    crit = fx_bk.checked_criterion(
        lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()), "mean")
    for t in (5, 9, 17, 4):
        logits = torch.randn(3, t, 7, requires_grad=True)
        y = torch.randint(0, 7, (3, t))
        loss = crit(logits, y)
        torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    assert sum(len(r.programs) for r in crit._graphs.values()) == 2


def test_dynamic_argument_errors():
    model = TwoLinears()
    with pytest.raises(ConfigError, match="not arguments"):
        fx_bk.transform(model, max_grad_norm=1.0, dynamic={"nope": 1})
    with pytest.raises(ConfigError, match="dim 0 is the batch"):
        fx_bk.transform(model, max_grad_norm=1.0, dynamic={"x": 0})
    with pytest.raises(ConfigError, match="mapping"):
        fx_bk.transform(model, max_grad_norm=1.0, dynamic=[1])


class SeqFirstAttention(nn.Module):
    """``nn.MultiheadAttention`` on ``[T, B, d]``: rows laid out around a dynamic length."""

    def __init__(self):
        super().__init__()
        self.att, self.ln, self.out = nn.MultiheadAttention(8, 2), nn.LayerNorm(8), \
            nn.Linear(8, 3)

    def forward(self, x):
        h = x.transpose(0, 1)
        h = self.ln(self.att(h, h, h, need_weights=False)[0])
        return self.out(h).mean(0)


def test_seq_first_layout_with_a_dynamic_length():
    model = SeqFirstAttention().double()
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    y = torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to per-length traces
        for t in (5, 9, 3):
            x = torch.randn(3, t, 8, dtype=torch.float64)
            _check_rows(bk, model, x, y)
    assert len(bk.programs) == 2
