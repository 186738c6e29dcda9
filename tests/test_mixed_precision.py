"""bfloat16 autocast (CPU): forward under ``torch.autocast``, backward outside it, as in AMP.

The reference is the float32 vmap oracle without autocast, so the gradients differ by bf16
rounding of the forward/backward (about 3 significant digits; measured max relative error
5e-3 .. 1.4e-2, the same as plain non-private AMP vs float32 on these models): tolerance 3e-2.
The per-sample norms are checked apart, at float32 precision, against norms computed in float64
from the same bf16 activations and output gradients, and in the backward graph's dtypes. The
clipped Linear/matmul GEMMs read the float32 copies (a bf16 GEMM lets one sample exceed the
bound: shown on the op), instantiated convolutions' per-sample gradients the bf16 operands;
both checked in the joint graph, and the error vs float32 against plain AMP's.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.kernels.clipped_gemm import clipped_gemm
from fx_bk.rules.linear import LinearRule
from fx_bk.site import Strategy
from fx_bk.testing import fx_bk_grads, max_rel_err, vmap_clipped_sum
from fx_bk.testing.models import MODELS, batch_for

BF16_TOL = 3e-2  # bf16 keeps 8 significant bits
F32_TOL = 1e-5


def _amp_grads(bk, model, x, y, reduction="mean") -> dict:
    """One step with the forward under bf16 autocast; ``p.grad`` by name."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bk(x)
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), y, reduction=reduction).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 for g in grads.values())
    return grads


def _setup(name, b, seed, r, compiled, reduction="mean"):
    torch.manual_seed(seed)
    model = MODELS[name]()
    x, y = batch_for(name, model, b, seed=seed)
    bk = fx_bk.transform(model, max_grad_norm=r, loss_reduction=reduction)
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    return model, bk, run, x, y


@pytest.mark.parametrize("name", ["mlp", "transformer"])
@pytest.mark.parametrize("r", [1e-3, 0.5])
def test_bf16_autocast_eager_matches_f32_oracle(name, r):
    model, _, bk, x, y = _setup(name, 8, seed=1, r=r, compiled=False)
    got = _amp_grads(bk, model, x, y)
    assert max_rel_err(got, vmap_clipped_sum(model, x, y, r)) <= BF16_TOL


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_bf16_autocast_compiled_matches_f32_oracle(name):
    model, _, compiled, x, y = _setup(name, 8, seed=2, r=0.5, compiled=True, reduction="sum")
    got = _amp_grads(compiled, model, x, y, "sum")
    assert max_rel_err(got, vmap_clipped_sum(model, x, y, 0.5)) <= BF16_TOL


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_same_module_with_and_without_autocast(compiled):
    """Separate programs per autocast state: never a bf16 program for a float32 call (and the
    compiled module recompiles on the autocast state instead of reusing the first graph)."""
    model, bk, run, x, y = _setup("transformer", 6, seed=3, r=0.5, compiled=compiled)
    ref = vmap_clipped_sum(model, x, y, 0.5)
    for _ in range(2):
        assert max_rel_err(_amp_grads(run, model, x, y), ref) <= BF16_TOL
        assert max_rel_err(fx_bk_grads(run, model, x, y, "mean"), ref) <= F32_TOL
    assert len(bk.programs) == 2
    assert {p.prog.autocast for p in bk.programs} == {
        (("cpu", True, torch.bfloat16),), (("cpu", False, None),)
    }


def test_autocast_inside_compiled_step():
    model, bk, _, x, y = _setup("mlp", 8, seed=4, r=0.5, compiled=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return bk(x)

    got = _amp_grads(forward, model, x, y)
    assert max_rel_err(got, vmap_clipped_sum(model, x, y, 0.5)) <= BF16_TOL


class SeqMLP(nn.Module):
    """A Linear on ``[B, T, d]`` (ghost norm: T(d+p) < pd) and a T = 1 head (rank-one)."""

    def __init__(self, d=32, classes=5):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # [B, 4, d]
        return self.head(torch.tanh(self.fc(x)).mean(1))


def _bf16_site_norms(model: nn.Module, x, y) -> torch.Tensor:
    """Per-sample gradient norms (loss_reduction="sum") of a Linear-only model under bf16
    autocast, computed in float64 from the activations and output gradients the autocast
    forward/backward produced (bf16): what fx_bk's norms are, up to float32 accumulation."""
    records = []

    def hook(mod, inputs, out):
        out.retain_grad()
        records.append((inputs[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.cross_entropy(out.float(), y, reduction="sum").backward()
    for h in handles:
        h.remove()
    sq = torch.zeros(len(x), dtype=torch.float64)
    for a, s in records:
        a = a.to(s.dtype).double().reshape(len(x), -1, a.shape[-1])  # what the bf16 GEMM read
        g = s.grad.double().reshape(len(x), -1, s.shape[-1])
        sq += torch.einsum("btp,btd->bpd", g, a).pow(2).sum((1, 2)) + g.sum(1).pow(2).sum(1)
    return sq.sqrt()


@pytest.mark.parametrize("name", ["mlp", "seq"])
def test_norms_accumulate_in_float32(name):
    """fx_bk's norms equal float64 norms of the same bf16 per-sample gradients to float32
    precision (bf16 accumulation would be off by ~1e-3), while the clipped grads are only
    bf16-close to the float32 oracle."""
    torch.manual_seed(5)
    model = MODELS["mlp"]() if name == "mlp" else SeqMLP()
    x = torch.randn(8, 12) if name == "mlp" else torch.randn(8, 4, 32)
    y = torch.randint(0, 5, (8,))
    bk = fx_bk.transform(model, max_grad_norm=1e3, loss_reduction="sum")
    _amp_grads(bk, model, x, y, "sum")
    norms = bk.last_per_sample_norms
    assert norms.dtype == torch.float32
    ref = _bf16_site_norms(model, x, y)
    assert ((norms.double() - ref).abs() / ref).max().item() <= F32_TOL


class MatmulNet(nn.Module):
    """A bare parameter on the right of a matmul (the matmul rule; HF ``Conv1D``)."""

    def __init__(self, d=24, p=40, classes=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, p) / 5)
        self.head = nn.Linear(p, classes)

    def forward(self, x):  # [B, T, d]
        return self.head(torch.tanh(x @ self.w).mean(1))


def _model(name: str, b: int, seed: int):
    torch.manual_seed(seed)
    if name == "seq":
        model, x = SeqMLP(), torch.randn(b, 4, 32)
    elif name == "matmul":
        model, x = MatmulNet(), torch.randn(b, 6, 24)
    else:
        model = MODELS[name]()
        return model, *batch_for(name, model, b, seed=seed)
    return model, x, torch.randint(0, 5, (b,))


def _gemm_weights(prog) -> dict:
    """Weight name -> shape, for the Linear/matmul sites whose clipped sum is one GEMM."""
    return {s.params["weight"]: tuple(s.shapes["weight"]) for s in prog.sites
            if isinstance(s.rule, LinearRule) and "weight" in s.params
            and s.strategy != Strategy.INSTANTIATE}


@pytest.mark.parametrize("name", ["mlp", "transformer", "seq", "matmul", "reused", "resnet_gn"])
def test_error_same_order_as_plain_amp(name):
    """Without clipping (R = 1e6, every C = 1), fx_bk under bf16 autocast is as far from the
    float32 oracle as plain non-private AMP is from plain float32 on the same model and batch
    (the bf16 forward and backward; the clipped sums read float32 copies, and instantiated
    convolutions AMP's bf16 weight-gradient kernel)."""
    model, x, y = _model(name, 16, seed=7)
    ref = vmap_clipped_sum(model, x, y, 1e6)
    plain = _amp_grads(model, model, x, y, "sum")
    bk = fx_bk.transform(model, max_grad_norm=1e6, loss_reduction="sum")
    got = _amp_grads(bk, model, x, y, "sum")
    amp_err, bk_err = max_rel_err(plain, ref), max_rel_err(got, ref)
    assert amp_err > 1e-4  # bf16 rounding is visible: the comparison means something
    assert bk_err <= 2 * amp_err + 1e-3, (bk_err, amp_err)


def test_a_bf16_clipped_gemm_would_let_one_sample_exceed_the_bound():
    """Why the clipped GEMMs read float32 under autocast: one sample (T = 2) whose position terms
    nearly cancel, ``||G|| = 1.03``; with ``c g`` and the sum rounded to bf16 its clipped
    contribution is 4.2 R, from the same values in float32 it is R."""
    a = torch.tensor([[[1.7421875], [1.765625]]])  # [B=1, T=2, d=1], bf16 values
    g = torch.tensor([[[496.0], [-490.0]]])  # [1, 2, p=1]
    bound = 1.0
    norm = (g * a).sum().abs()
    c = (bound / (norm + 1e-6)).reshape(1)
    narrow = clipped_gemm(a.bfloat16(), g.bfloat16(), c, False).float().norm()
    wide = clipped_gemm(a, g, c, False).norm()
    assert narrow > 4 * bound
    assert wide <= bound * (1 + 1e-5)


@pytest.mark.parametrize("name,compiled", [
    ("transformer", False), ("seq", False), ("matmul", False), ("reused", False),
    ("transformer", True),
])
def test_clipped_gemms_read_float32(name, compiled):
    """Under bf16 autocast the clipped weight gradient of a Linear/matmul site reads the float32
    copies of its activations and output gradients (the norms' values), so each sample's
    contribution is bounded as in float32; the per-sample norms are float32 too (their
    precision: ``test_norms_accumulate_in_float32``)."""
    model, x, y = _model(name, 8, seed=8)
    bk = fx_bk.transform(model, max_grad_norm=0.5, loss_reduction="mean")
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    got = _amp_grads(run, model, x, y)
    ref = vmap_clipped_sum(model, x, y, 0.5)
    assert max_rel_err(got, ref) <= BF16_TOL
    assert bk.last_per_sample_norms.dtype == torch.float32
    prog = bk.programs[0].prog
    weights = _gemm_weights(prog)
    assert weights, "no Linear/matmul site with a GEMM clipped sum"
    nodes = prog.joint_graph.graph.nodes
    ops = [n for n in nodes if n.target is torch.ops.fx_bk.clipped_gemm.default]  # T > 1
    mms = [n for n in nodes if n.target is torch.ops.aten.mm.default  # T = 1, in the graph
           and all(type(d) is int for d in n.meta["val"].shape)  # not [B.., *]
           and tuple(n.meta["val"].shape) in weights.values()]
    assert len(ops) + len(mms) >= len(weights)
    for n in ops + mms:
        assert [a.meta["val"].dtype for a in n.args[:2]] == [torch.float32] * 2, n.format_node()
        assert n.meta["val"].dtype == torch.float32, n.format_node()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_per_sample_conv_gradients_run_in_bf16(compiled, monkeypatch):
    """An instantiated convolution's per-sample weight gradients under bf16 autocast are AMP's
    weight gradient, one sample at a time: the op reads the bf16 input and output gradient the
    convolution computed with and returns bf16, widened to float32 for the norms and the
    clipped sum (both from the same values); without autocast it reads float32."""
    conv_rules = importlib.import_module("fx_bk.rules.conv")
    monkeypatch.setattr(conv_rules, "conv_strategy", lambda *args: (Strategy.INSTANTIATE, 1))
    model, bk, run, x, y = _setup("resnet_gn", 6, seed=9, r=0.5, compiled=compiled)
    _amp_grads(run, model, x, y)  # its error: test_error_same_order_as_plain_amp[resnet_gn]
    fx_bk_grads(run, model, x, y, "mean")  # the float32 program
    dtypes = {}
    for program in bk.programs:
        ops = [n for n in program.prog.joint_graph.graph.nodes
               if n.target is torch.ops.fx_bk.conv_per_sample_weight_grad.default]
        assert ops, "no instantiated convolution"
        dtypes[program.prog.autocast[0][1]] = {
            (n.args[0].meta["val"].dtype, n.args[1].meta["val"].dtype, n.meta["val"].dtype)
            for n in ops}
    assert dtypes == {True: {(torch.bfloat16,) * 3}, False: {(torch.float32,) * 3}}


def test_norms_and_clipped_sums_read_float32_copies(monkeypatch):
    """Under bf16 autocast the site outputs are bf16; the norms, clip factors and clipped sums
    (``fx_bk.clipping.clipped_gradients``, traced into the backward) receive float32
    activations and output gradients, the Linear sites also the bf16 tensors the op computed
    with (``SiteValues.computed``, which only instantiated per-sample gradients may read), and
    return float32 norms and grads."""
    module = importlib.import_module("passes.build_joint")  # the package exports the function
    original = module.clipped_gradients
    seen: dict = {"in": set(), "computed": set(), "out": set()}

    def spy(bundles, *args):
        for values, _, _ in bundles:
            for v in values:
                seen["in"].update(t.dtype for t in [v.grad, *v.tensors.values()]
                                  if t.is_floating_point())
                if isinstance(v.site.rule, LinearRule):
                    assert v.compute_dtype == torch.bfloat16
                    seen["computed"].update(t.dtype for t in v.computed.values())
        grads, norms = original(bundles, *args)
        seen["out"].update(t.dtype for t in [norms, *grads.values()])
        return grads, norms

    monkeypatch.setattr(module, "clipped_gradients", spy)
    model, bk, _, x, y = _setup("transformer", 4, seed=6, r=0.5, compiled=False)
    _amp_grads(bk, model, x, y)
    prog = bk.programs[0].prog
    by_name = {n.name: n for n in prog.forward_graph.graph.nodes}
    site_out = {by_name[s.node].meta["val"].dtype for s in prog.sites}
    assert torch.bfloat16 in site_out  # the Linear sites ran in bf16
    assert seen["in"] == {torch.float32}
    assert seen["computed"] == {torch.bfloat16}
    assert seen["out"] == {torch.float32}
