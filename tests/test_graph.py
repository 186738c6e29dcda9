"""The structure BK promises: one forward, one backward, no unclipped weight-gradient GEMM."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk._torch_internals import mutating_ops
from fx_bk.rules import conv as conv_rules
from fx_bk.rules.linear import LinearRule
from fx_bk.site import Strategy
from fx_bk.testing import max_rel_err, vmap_clipped_sum
from fx_bk.testing.models import MODELS, batch_for

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default,
           torch.ops.fx_bk.clipped_gemm.default}  # a Linear site's clipped GEMM


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _static_shape(node):
    """The node's shape if it does not depend on the batch size, else None."""
    shape = node.meta["val"].shape
    return None if any(isinstance(d, torch.SymInt) for d in shape) else tuple(shape)


@pytest.mark.parametrize("name", ["mlp", "transformer", "reused"])
def test_every_weight_gradient_matmul_is_clipped(name):
    model = MODELS[name]()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    x, _ = batch_for(name, model, 4, seed=0)
    bk(x)
    (compiled,) = bk.programs
    prog, bw = compiled.prog, compiled.prog.bw_graph.graph
    linear_weights = {
        tuple(p.shape) for n, p in model.named_parameters()
        if any(s.params.get("weight") == n and s.rule.name == "linear" for s in prog.sites)
    }
    clamps = [n for n in bw.nodes if n.target in (aten.clamp.default, aten.clamp_max.default)]
    assert len(clamps) == 1, "exactly one clip-factor computation"
    weight_like = linear_weights | {s[::-1] for s in linear_weights}
    weight_matmuls = [
        n for n in bw.nodes if n.target in MATMULS and _static_shape(n) in weight_like
    ]
    ghost_or_rank_one = [s for s in prog.sites
                         if s.rule.name == "linear" and s.strategy in ("ghost", "rank-one")]
    assert len(weight_matmuls) == len({s.params["weight"] for s in ghost_or_rank_one})
    for mm in weight_matmuls:
        assert clamps[0] in _ancestors(mm), f"{mm} computes a weight gradient without C"


@pytest.mark.parametrize("bias", [True, False])
def test_rank_one_norm_reduces_each_operand_once(bias):
    """A Linear site with one position: its squared norm is ``(||a||^2 + 1) ||g||^2`` with a
    bias (whose per-sample gradient is ``g`` itself), ``||a||^2 ||g||^2`` without: one squared
    reduction of each operand, none for the bias (another reduction of ``g`` lengthened
    Inductor's code generation). Exactness: the oracle tests."""
    model = nn.Linear(4, 3, bias=bias)
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    bk(torch.randn(5, 4))
    (compiled,) = bk.programs
    assert [str(s.strategy) for s in compiled.prog.sites] == ["rank-one"]
    pows = [n for n in compiled.prog.bw_graph.graph.nodes
            if n.target == torch.ops.aten.pow.Tensor_Scalar]
    assert len(pows) == 2


def test_clipped_gemm_is_the_op_over_positions_and_in_the_graph_at_one_position():
    """A Linear site over T > 1 positions gets its clipped weight gradient from one
    ``fx_bk::clipped_gemm`` (no scaling kernels of its own for Inductor); a site with one
    position per sample keeps the GEMM in the graph, where the scaling fuses into the kernel
    that produces its output gradient. Both read the clip factors."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Flatten(),
                          nn.Linear(20, 3))
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    bk(torch.randn(4, 5, 6))
    (compiled,) = bk.programs
    prog, bw = compiled.prog, compiled.prog.bw_graph.graph
    assert [s.strategy for s in prog.sites] == ["ghost", "ghost", "rank-one"]
    ops = [n for n in bw.nodes if n.target == torch.ops.fx_bk.clipped_gemm.default]
    assert sorted(tuple(n.meta["val"].shape) for n in ops) == [(4, 8), (8, 6)]
    head = [n for n in bw.nodes if n.target in MATMULS - {torch.ops.fx_bk.clipped_gemm.default}
            and _static_shape(n) in {(3, 20), (20, 3)}]
    assert len(head) == 1
    clamp = next(n for n in bw.nodes if n.target in (aten.clamp.default, aten.clamp_max.default))
    assert all(clamp in _ancestors(n) for n in ops + head)


def test_small_per_sample_gradients_are_reduced_together():
    """The biases' and LayerNorms' per-sample gradients of a clipping group are concatenated
    once (fx_bk/rules/pool.py): one reduction for their norm, one for their clipped sums,
    instead of two per parameter; one concatenation per group."""
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Linear(8, 3))
    first = ["0.weight", "0.bias", "1.weight", "1.bias"]
    rest = [n for n, _ in model.named_parameters() if n not in first]

    def pooled(**kw):
        bk = fx_bk.transform(model, max_grad_norm=1.0, **kw)
        bk(torch.randn(4, 5, 6))
        (compiled,) = bk.programs
        assert [s.strategy for s in compiled.prog.sites] == ["ghost", "instantiate"] * 2 + [
            "ghost"]
        cats = [n for n in compiled.prog.bw_graph.graph.nodes if n.target == aten.cat.default]
        return sorted((n.meta["val"].shape[1], len(n.args[0])) for n in cats)

    assert pooled() == [(8 + 16 + 8 + 16 + 3, 7)]  # 3 Linear biases, 2 x LayerNorm (w, b)
    assert pooled(clipping_style=[first, rest]) == [(8 + 16, 3), (8 + 16 + 3, 4)]


def test_conv_weight_gradients_come_from_the_convolution_kernel():
    """Conv sites compute their weight gradients with the convolution's weight-gradient kernel
    (the per-sample ones by ``fx_bk::conv_per_sample_weight_grad``, the clipped sum of a ghost
    site by ``fx_bk::clipped_conv_weight_grad``, which scales and masks inside: no pointwise
    kernel of its own for Inductor): im2col is only materialised for a ghost
    norm, kernel-major (channels innermost, as channels-last input holds them: a Gram does not
    depend on the column order). The per-sample gradients are reduced in the order the op
    stores them (read in the weight's order, Inductor's reductions stride across the
    storage)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),  # L = 64: instantiate
                          nn.Conv2d(4, 32, 3, stride=4, padding=1), nn.ReLU(),  # L = 4: ghost
                          nn.Flatten(), nn.Linear(128, 5))
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    bk(torch.randn(3, 3, 8, 8))
    (compiled,) = bk.programs
    prog, bw = compiled.prog, compiled.prog.bw_graph.graph
    assert [s.strategy for s in prog.sites if s.rule.name == "conv"] == ["instantiate", "ghost"]
    clipped = [n for n in bw.nodes if n.target == torch.ops.fx_bk.clipped_conv_weight_grad.default]
    assert not [n for n in bw.nodes if n.target == aten.convolution_backward.default
                and n.args[-1][1]], "no weight gradient of an unclipped output gradient"
    per_sample = [n for n in bw.nodes
                  if n.target == torch.ops.fx_bk.conv_per_sample_weight_grad.default]
    assert len(clipped) == 1 and clipped[0].args[-1] == 1 and len(per_sample) == 1
    assert [a.meta["val"].dim() for a in clipped[0].args[:3]] == [4, 4, 1], "x, g, C"
    clamps = [n for n in bw.nodes if n.target in (aten.clamp.default, aten.clamp_max.default)]
    assert clamps[0] in _ancestors(clipped[0]), "the ghost site's weight gradient reads C"
    assert clamps[0] not in _ancestors(per_sample[0]), "per-sample gradients come before C"
    unfolds = [n for n in bw.nodes if n.target == aten.unfold.default]
    assert 0 < len(unfolds) <= 2, "im2col only for the ghost site (one unfold per spatial dim)"
    (ghost,) = [n for n in bw.nodes if n.target == torch.ops.fx_bk.ghost_norm.default]
    windows = ghost.args[0]  # the im2col of the ghost site, through views to its permute
    while windows.target != aten.permute.default:
        windows = windows.args[0]
    assert windows.args[1][-1] == 1, "im2col kernel-major (channels innermost) for a Gram"
    readers = list(per_sample[0].users)  # the norm and the clipped sum read the op's storage
    assert readers and all(r.target == aten.permute.default and r.meta["val"].is_contiguous()
                           for r in readers), "per-sample weight gradients reduced in W's order"


@pytest.mark.parametrize("strategy", ["GHOST", "GHOST_GRAM"])
def test_conv_ghost_norm_pads_in_one_op_and_windows_the_gram_in_one_view(strategy, monkeypatch):
    """A padded conv's ghost norm pads by writing into a zero tensor (``slice_scatter``, one
    fused kernel), not by concatenating zero blocks (one kernel per block); the position-Gram
    norm takes all kernel offsets as one strided view of the Gram, not a slice per dim and
    offset, and pads channels last (``[B, *P, C]``, the layout Inductor gives convolution inputs
    on CPU: padded channel-major, its kernel gathered the input element by element). Exactness
    of both: tests/test_rules.py."""
    monkeypatch.setattr(conv_rules, "conv_strategy", lambda *a: (Strategy[strategy], 1))
    model = nn.Sequential(nn.Conv2d(5, 4, 3, padding=1, bias=False), nn.Flatten(),
                          nn.Linear(4 * 36, 2, bias=False))
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    bk(torch.randn(3, 5, 6, 6))
    (compiled,) = bk.programs
    assert [s.strategy for s in compiled.prog.sites if s.rule.name == "conv"] == [
        Strategy[strategy]]
    ops = [n.target for n in compiled.prog.joint_graph.graph.nodes]
    assert aten.cat.default not in ops
    assert ops.count(aten.slice_scatter.default) == 2  # one per padded spatial dim
    if strategy == "GHOST_GRAM":
        pads = [n for n in compiled.prog.joint_graph.graph.nodes
                if n.target == aten.slice_scatter.default]
        assert sorted(tuple(n.meta["val"].shape[1:]) for n in pads) == [(6, 8, 5), (8, 8, 5)]
    windows = ops.count(aten.as_strided.default)
    assert windows == (1 if strategy == "GHOST_GRAM" else 0)


class _TwoLayers(nn.Module):
    def __init__(self, case: str):
        super().__init__()
        middle = {"in-place forward": nn.ReLU(inplace=True), "dropout": nn.Dropout(0.5)}
        self.net = nn.Sequential(nn.Linear(5, 8), middle.get(case, nn.ReLU()), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("case", ["functional", "in-place forward", "in-place rule", "dropout"])
def test_joint_trace_is_functionalized_only_where_something_updates_in_place(case, monkeypatch):
    """The joint trace runs under functionalization (a tensor wrapper that doubles the trace's
    time) only when the forward graph updates a tensor in place, or when the plain trace meets
    an in-place op (a rule's here; dropout's ``bernoulli_`` in training), where it stops and the
    joint is traced again functionalized: the joint graph never holds an in-place op, and the
    clipped sums are exact either way."""
    build_joint = importlib.import_module("passes.build_joint")
    functionalized, rule_calls = [], []
    real_functionalize, norm_sq = build_joint.functionalize, LinearRule.norm_sq
    monkeypatch.setattr(build_joint, "functionalize",
                        lambda fn: functionalized.append(fn) or real_functionalize(fn))

    def counted_norm_sq(self, values):
        rule_calls.append(values)
        norm, state = norm_sq(self, values)
        if case == "in-place rule":
            norm = norm.clone()
            norm.mul_(1.0)  # an in-place op in the joint trace
        return norm, state

    monkeypatch.setattr(LinearRule, "norm_sq", counted_norm_sq)
    torch.manual_seed(0)
    model = _TwoLayers(case).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    max_grad_norm = 1e3 if case == "dropout" else 0.1  # dropout: replayed against plain grads
    bk = fx_bk.transform(model, max_grad_norm=max_grad_norm, loss_reduction="sum")
    bk(x)  # build
    (compiled,) = bk.programs
    assert bool(mutating_ops(compiled.prog.forward_graph)) == (case == "in-place forward")
    assert len(functionalized) == (0 if case == "functional" else 1)
    assert mutating_ops(compiled.prog.joint_graph) == []
    # two Linear bundles per full trace; the plain trace stopped at the first in-place op
    assert len(rule_calls) == (3 if case == "in-place rule" else 2)
    torch.manual_seed(7)
    model.zero_grad()
    F.cross_entropy(bk(x), y, reduction="sum").backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    if case == "dropout":  # R is large: the clipped sum is the plain gradient of the same mask
        torch.manual_seed(7)
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        ref = {n: p.grad for n, p in model.named_parameters()}
    else:
        ref = vmap_clipped_sum(model, x, y, max_grad_norm, loss_fn=F.cross_entropy)
    assert max_rel_err(got, ref) < 1e-10


def test_one_backward_per_loss_backward(monkeypatch):
    model = MODELS["transformer"]()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    x, y = batch_for("transformer", model, 5, seed=0)
    bk(x)  # build
    (compiled,) = bk.programs
    calls = {"fw": 0, "bw": 0}
    fw, bw = compiled.prog.fw_graph, compiled.prog.bw_graph

    def count(graph, key):
        def run(*args):
            calls[key] += 1
            return graph.forward(*args)
        return run

    monkeypatch.setattr(compiled.prog, "fw_graph", count(fw, "fw"))
    monkeypatch.setattr(compiled.prog, "bw_graph", count(bw, "bw"))
    grad_fns = []
    loss = F.cross_entropy(bk(x), y)
    node = loss.grad_fn
    while node is not None:  # walk back to our autograd node
        grad_fns.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    loss.backward()
    assert calls == {"fw": 1, "bw": 1}
    assert "BKFunctionBackward" in grad_fns
    # the parameters are reached from the loss only through fx_bk's one backward node
    assert all(p.grad is not None for p in model.parameters())


def test_partly_used_and_non_differentiable_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x), "argmax": self.a(x).argmax(-1)}

    model = TwoHeads()
    bk = fx_bk.transform(model, max_grad_norm=1e3, loss_reduction="sum")
    out = bk(torch.randn(6, 4))
    assert set(out) == {"a", "b", "argmax"} and out["argmax"].dtype == torch.long
    out["a"].sum().backward()
    assert model.b.weight.grad is not None and model.b.weight.grad.abs().max() == 0
    assert model.unused.weight.grad is None
    assert model.a.bias.grad is not None and torch.allclose(model.a.bias.grad, torch.full((3,), 6.))


def test_output_independent_of_parameters_gets_no_tangent_confusion():
    class Passthrough(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return x * 2.0, self.fc(x), x.sum(-1)

    model = Passthrough().double()
    bk = fx_bk.transform(model, max_grad_norm=1e3, loss_reduction="sum")
    x = torch.randn(5, 4, dtype=torch.float64)
    a, b, c = bk(x)
    (a.sum() + b.pow(2).sum() + c.sum()).backward()
    model2 = Passthrough().double()
    model2.load_state_dict(model.state_dict())
    model2(x)[1].pow(2).sum().backward()
    assert torch.allclose(model.fc.weight.grad, model2.fc.weight.grad)
