"""Table-driven rule tests: every rule and strategy against the vmap oracle, in float64.

Each row names the strategy its shapes must select, so a row cannot silently stop exercising
the path it is meant for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fx_bk
from fx_bk.rules import conv as conv_rules
from fx_bk.site import Strategy
from fx_bk.testing import fx_bk_grads, max_rel_err, vmap_clipped_sum


class Head(nn.Module):
    """``body`` then a mean over every non-batch position and a linear head to 3 classes."""

    def __init__(self, body: nn.Module, width: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(h.reshape(h.shape[0], -1, h.shape[-1]).mean(1))


class Twice(nn.Module):
    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Bare(nn.Module):
    """A bare parameter in a broadcasting op: ``fn(x, p)``."""

    def __init__(self, shape, fn):
        super().__init__()
        self.p = nn.Parameter(torch.randn(shape))
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.p)


def _cls_token(x, p):  # p: [1, 1, d] -> [B, 1 + T, d]
    return torch.cat([p.expand(x.shape[0], -1, -1), x], dim=1)


def _frozen(module: nn.Module, *names: str) -> nn.Module:
    for n in names:
        getattr(module, n).requires_grad_(False)
    return module


def floats(*shape):
    return lambda g, b: torch.randn(b, *shape, generator=g, dtype=torch.float64)


def tokens(vocab, t, pad=None):
    def make(g, b):
        x = torch.randint(0, vocab, (b, t), generator=g)
        if pad is not None:
            x[:, -2:] = pad
        return x

    return make


@dataclass
class RuleCase:
    id: str
    body: Callable[[], nn.Module]
    width: int  # last dim of the body's output
    inputs: Callable
    site: str  # the body's site whose strategy is checked
    strategy: str


RULE_CASES = [
    RuleCase("linear-rank-one", lambda: nn.Linear(6, 5), 5, floats(6), "linear", "rank-one"),
    RuleCase("linear-ghost", lambda: nn.Linear(40, 30), 30, floats(3, 40), "linear", "ghost"),
    # instantiation is chosen only where T is large against p*d (fx_bk.cost_model.instantiated_cost)
    RuleCase("linear-instantiate", lambda: nn.Linear(3, 4), 4, floats(200, 3), "linear",
             "instantiate"),
    RuleCase("linear-4d-input", lambda: nn.Linear(4, 5), 5, floats(20, 10, 4), "linear",
             "instantiate"),
    RuleCase("linear-4d-input-ghost", lambda: nn.Linear(4, 5), 5, floats(2, 3, 4), "linear",
             "ghost"),
    RuleCase("linear-no-bias", lambda: nn.Linear(30, 20, bias=False), 20, floats(2, 30),
             "linear", "ghost"),
    RuleCase("linear-frozen-weight", lambda: _frozen(nn.Linear(6, 5), "weight"), 5,
             floats(4, 6), "linear", "bias-only"),
    RuleCase("linear-twice-rank-one", lambda: Twice(nn.Linear(5, 5)), 5, floats(5), "linear",
             "ghost"),
    RuleCase("linear-twice-3d", lambda: Twice(nn.Linear(3, 3)), 3, floats(100, 3), "linear",
             "instantiate"),
    RuleCase("embedding", lambda: nn.Embedding(7, 4), 4, tokens(7, 6), "embedding", "ghost"),
    RuleCase("embedding-padding", lambda: nn.Embedding(7, 4, padding_idx=2), 4,
             tokens(7, 6, pad=2), "embedding", "ghost"),
    RuleCase("layer_norm", lambda: nn.LayerNorm(5), 5, floats(3, 5), "layer_norm",
             "instantiate"),
    RuleCase("layer_norm-no-bias", lambda: nn.LayerNorm(5, bias=False), 5, floats(3, 5),
             "layer_norm", "instantiate"),
    RuleCase("layer_norm-2d-shape", lambda: nn.LayerNorm([3, 5]), 5, floats(2, 3, 5),
             "layer_norm", "instantiate"),
    RuleCase("layer_norm-frozen-bias", lambda: _frozen(nn.LayerNorm(5), "bias"), 5,
             floats(3, 5), "layer_norm", "instantiate"),
    RuleCase("layer_norm-2d-input", lambda: nn.LayerNorm(5), 5, floats(5), "layer_norm",
             "instantiate"),
    RuleCase("conv1d", lambda: nn.Conv1d(2, 3, 3), 6, floats(2, 8), "conv", "ghost"),
    RuleCase("conv1d-stride-dilation-pad", lambda: nn.Conv1d(2, 4, 3, stride=2, dilation=2,
             padding=3), 6, floats(2, 9), "conv", "ghost"),
    RuleCase("conv2d-ghost", lambda: nn.Conv2d(8, 16, 3, padding=1), 3, floats(8, 3, 3),
             "conv", "ghost (position Grams)"),
    RuleCase("conv2d-same-even-kernel", lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), 5,
             floats(2, 4, 5), "conv", "instantiate"),
    RuleCase("conv2d-same-even-kernel-ghost", lambda: nn.Conv2d(16, 16, 2, padding="same"), 3,
             floats(16, 3, 3), "conv", "ghost (position Grams)"),
    RuleCase("conv2d-valid-no-bias", lambda: nn.Conv2d(2, 3, 3, padding="valid", bias=False), 3,
             floats(2, 5, 5), "conv", "ghost"),
    RuleCase("conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2, stride=(1, 2)), 2,
             floats(4, 5, 5), "conv", "ghost"),
    RuleCase("conv2d-depthwise", lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1), 4,
             floats(3, 4, 4), "conv", "instantiate"),
    RuleCase("conv2d-frozen-weight", lambda: _frozen(nn.Conv2d(2, 3, 3), "weight"), 2,
             floats(2, 4, 4), "conv", "bias-only"),
    RuleCase("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), 3, floats(2, 3, 4, 4),
             "conv", "ghost"),
    RuleCase("conv_transpose1d", lambda: nn.ConvTranspose1d(2, 3, 3), 10, floats(2, 8),
             "conv_transpose", "ghost (position Grams)"),
    RuleCase("conv_transpose1d-stride2-output-padding", lambda: nn.ConvTranspose1d(
             2, 3, 3, stride=2, padding=1, output_padding=1), 10, floats(2, 5),
             "conv_transpose", "ghost"),
    # output_padding >= stride (allowed since dilation > stride): unfold has extra windows
    RuleCase("conv_transpose1d-dilation-output-padding", lambda: nn.ConvTranspose1d(
             2, 3, 3, dilation=2, padding=2, output_padding=1), 7, floats(2, 6),
             "conv_transpose", "ghost"),
    RuleCase("conv_transpose2d-ghost", lambda: nn.ConvTranspose2d(16, 16, 3, padding=1), 3,
             floats(16, 3, 3), "conv_transpose", "ghost (position Grams)"),
    RuleCase("conv_transpose2d-ghost-groups", lambda: nn.ConvTranspose2d(
             16, 16, 3, padding=1, groups=2, bias=False), 3, floats(16, 2, 3),
             "conv_transpose", "ghost"),
    RuleCase("conv_transpose2d-stride2-output-padding-groups", lambda: nn.ConvTranspose2d(
             4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), 8, floats(4, 3, 4),
             "conv_transpose", "ghost"),
    RuleCase("conv_transpose2d-depthwise", lambda: nn.ConvTranspose2d(
             3, 3, 3, groups=3, stride=(2, 1), output_padding=(1, 0)), 6, floats(3, 4, 4),
             "conv_transpose", "instantiate"),
    RuleCase("conv_transpose2d-dilation-no-bias", lambda: nn.ConvTranspose2d(
             2, 3, (2, 3), dilation=(2, 1), padding=(1, 0), bias=False), 7, floats(2, 4, 5),
             "conv_transpose", "instantiate"),
    RuleCase("conv_transpose2d-frozen-weight", lambda: _frozen(nn.ConvTranspose2d(2, 3, 3),
             "weight"), 6, floats(2, 4, 4), "conv_transpose", "bias-only"),
    RuleCase("conv_transpose1d-twice", lambda: Twice(nn.ConvTranspose1d(3, 3, 3, padding=1)),
             5, floats(3, 5), "conv_transpose", "instantiate (shared parameter)"),
    RuleCase("conv_transpose3d", lambda: nn.ConvTranspose3d(
             2, 3, 2, stride=(1, 2, 1), output_padding=(0, 1, 0)), 4, floats(2, 2, 3, 3),
             "conv_transpose", "instantiate"),
    RuleCase("conv_transpose3d-groups-dilation-stride", lambda: nn.ConvTranspose3d(
             4, 4, 3, groups=2, dilation=2, stride=2, padding=2, output_padding=1, bias=False),
             6, floats(4, 2, 2, 3), "conv_transpose", "ghost"),
    # torch.convolution called directly: by its `transposed` argument
    RuleCase("convolution-transposed", lambda: Bare((4, 3, 3), lambda x, p: torch.convolution(
             x, p, None, [2], [1], [1], True, [1], 2)), 16, floats(4, 8), "convolution",
             "ghost"),
    RuleCase("convolution-not-transposed", lambda: Bare((4, 3, 3), lambda x, p: torch.convolution(
             x, p, None, [2], [1], [1], False, [0], 2)), 9, floats(6, 18), "convolution",
             "ghost"),
    RuleCase("group_norm", lambda: nn.GroupNorm(2, 4), 5, floats(4, 3, 5), "group_norm",
             "instantiate"),
    RuleCase("group_norm-1d", lambda: nn.GroupNorm(3, 6), 4, floats(6, 4), "group_norm",
             "instantiate"),
    RuleCase("instance_norm", lambda: nn.InstanceNorm1d(3, affine=True), 5, floats(3, 5),
             "instance_norm", "instantiate"),
    RuleCase("instance_norm2d", lambda: nn.InstanceNorm2d(2, affine=True), 4, floats(2, 3, 4),
             "instance_norm", "instantiate"),
    RuleCase("bare-add-positions", lambda: Bare((4, 5), torch.add), 5, floats(4, 5),
             "broadcast_add", "instantiate"),
    RuleCase("bare-add-leading-one", lambda: Bare((1, 4, 5), lambda x, p: p + x), 5,
             floats(4, 5), "broadcast_add", "instantiate"),
    RuleCase("bare-sub-alpha", lambda: Bare((5,), lambda x, p: torch.sub(x, p, alpha=0.5)), 5,
             floats(4, 5), "broadcast_add", "instantiate"),
    RuleCase("bare-mul-scale", lambda: Bare((5,), torch.mul), 5, floats(3, 5),
             "broadcast_mul", "instantiate"),
    RuleCase("bare-mul-channels", lambda: Bare((2, 1, 1), lambda x, p: p * x), 4,
             floats(2, 3, 4), "broadcast_mul", "instantiate"),
    RuleCase("bare-cls-token", lambda: Bare((1, 1, 5), _cls_token), 5, floats(3, 5), "expand",
             "instantiate"),
    RuleCase("rms_norm", lambda: nn.RMSNorm(5), 5, floats(3, 5), "rms_norm", "instantiate"),
    RuleCase("fallback-prelu-channels", lambda: nn.PReLU(3), 5, floats(3, 5),
             "any other op (fallback)", "vmap(vjp)"),
    RuleCase("fallback-prelu-shared-slope", lambda: nn.PReLU(), 5, floats(4, 5),
             "any other op (fallback)", "vmap(vjp)"),
    RuleCase("rms_norm-eps-2d-shape", lambda: nn.RMSNorm([2, 5], eps=1e-3), 5,
             floats(2, 5), "rms_norm", "instantiate"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", RULE_CASES, ids=[c.id for c in RULE_CASES])
def test_rule_matches_vmap_oracle(case: RuleCase, reduction: str):
    torch.manual_seed(0)
    model = Head(case.body(), case.width).double()
    norm = 0.3
    bk = fx_bk.transform(model, max_grad_norm=norm, loss_reduction=reduction)
    for b in (1, 6):
        g = torch.Generator().manual_seed(b)
        x, y = case.inputs(g, b), torch.randint(0, 3, (b,), generator=g)
        got = fx_bk_grads(bk, model, x, y, reduction)
        err = max_rel_err(got, vmap_clipped_sum(model, x, y, norm))
        assert err <= 1e-10, f"{case.id} B={b} {reduction}: rel err {err:.2e}"
    (compiled,) = bk.programs
    body_sites = [s for s in compiled.prog.sites
                  if any(p.startswith("body.") for p in s.params.values())]
    assert {s.rule.name for s in body_sites} == {case.site}
    strategies = {s.strategy for s in body_sites}
    assert strategies == {case.strategy}, strategies


CONV_CASES = [c for c in RULE_CASES if c.site in ("conv", "conv_transpose")
              and c.strategy in ("ghost", "ghost (position Grams)", "instantiate")]
CONV_STRATEGIES = (Strategy.GHOST, Strategy.GHOST_GRAM, Strategy.INSTANTIATE)


@pytest.mark.parametrize("strategy", CONV_STRATEGIES, ids=[s.name for s in CONV_STRATEGIES])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c.id for c in CONV_CASES])
def test_every_conv_strategy_matches_vmap_oracle(case: RuleCase, strategy, monkeypatch):
    """Every convolution geometry of the table under each of the three strategies, whichever
    the cost model would pick: the same clipped sum as the vmap oracle, in float64."""
    monkeypatch.setattr(conv_rules, "conv_strategy", lambda *args: (strategy, 1))
    torch.manual_seed(0)
    model = Head(case.body(), case.width).double()
    bk = fx_bk.transform(model, max_grad_norm=0.3, loss_reduction="sum")
    g = torch.Generator().manual_seed(5)
    x, y = case.inputs(g, 5), torch.randint(0, 3, (5,), generator=g)
    err = max_rel_err(fx_bk_grads(bk, model, x, y, "sum"), vmap_clipped_sum(model, x, y, 0.3))
    assert err <= 1e-10, f"{case.id} {strategy}: rel err {err:.2e}"
    (compiled,) = bk.programs
    assert {s.strategy for s in compiled.prog.sites if s.rule.name == case.site} == {strategy}


@pytest.mark.parametrize("shape, expected", [
    # the benchmark CNN's 64-channel 16x16 conv: the position Gram's norm (11.5 M) is below
    # instantiation's charge (14.2 M), but with its clipped weight-gradient conv (9.4 M) it is not
    ((256, 64, 64, 9, 18 * 18), Strategy.INSTANTIATE),
    ((64, 128, 128, 9, 10 * 10), Strategy.GHOST_GRAM),  # 128 channels at 8x8
    ((64, 64, 128, 9, None), Strategy.GHOST),  # stride 2 from 16x16 (no position Gram)
    ((1024, 32, 32, 9, 34 * 34), Strategy.INSTANTIATE),  # 32 channels at 32x32
])
def test_conv_strategy_compares_complete_costs(shape, expected):
    """A ghost convolution pays its norm and a clipped weight-gradient convolution
    (``positions * p * d``); an instantiated one its charged per-sample gradients only."""
    from fx_bk import cost_model

    positions, c, p, kernel, windowed = shape
    strategy, norm_cost = cost_model.conv_strategy(positions, c, p, kernel, windowed)
    assert strategy == expected
    d = c * kernel
    ghost = cost_model.ghost_cost(positions, d, p) + positions * p * d
    gram = (cost_model.position_gram_cost(windowed, positions, c, p, kernel) + positions * p * d
            if windowed is not None else None)
    instantiate = cost_model.instantiated_cost(positions, p, d)
    complete = {Strategy.GHOST: ghost, Strategy.GHOST_GRAM: gram,
                Strategy.INSTANTIATE: instantiate}
    assert complete[expected] == min(v for v in complete.values() if v is not None)
    if expected == Strategy.INSTANTIATE:
        assert norm_cost == positions * p * d


class _ShiftedGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn, self.head = nn.GroupNorm(2, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.gn(x)).mean((2, 3)))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shift", [0.0, 100.0])
def test_group_norm_per_sample_grads_in_float32_as_accurate_as_pytorch(shift, compiled):
    """Group norm's per-sample weight gradients come from its backward's sums,
    ``(sum g x - mean * sum g) * rstd``, PyTorch's own ``dgamma`` formula: on inputs whose mean
    is far from zero (100 standard deviations) their float32 error stays of the order of
    non-private float32's own against float64."""
    torch.manual_seed(0)
    model = _ShiftedGroupNorm()
    x, y = torch.randn(6, 8, 5, 5) + shift, torch.randint(0, 3, (6,))
    model64 = _ShiftedGroupNorm().double()
    model64.load_state_dict(model.state_dict())
    ref = vmap_clipped_sum(model64, x.double(), y, 0.01)
    bk = fx_bk.transform(model, max_grad_norm=0.01)
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    got = fx_bk_grads(run, model, x, y, "mean")
    err = max_rel_err({n: g.double() for n, g in got.items()}, ref)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model64.zero_grad()
    nn.functional.cross_entropy(model64(x.double()), y).backward()
    plain = max_rel_err({n: p.grad.double() for n, p in model.named_parameters()},
                        {n: p.grad for n, p in model64.named_parameters()})
    assert err <= 5 * max(plain, 1e-6), (err, plain)
    (program,) = bk.programs
    assert any(s.rule.name == "group_norm" for s in program.prog.sites)


def _generated_code(run, *args) -> list[str]:
    """The Python modules Inductor writes for one compiled step (caches off)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    files, compile_to_module = [], GraphLowering.compile_to_module

    def keep(self, *a, **k):
        module = compile_to_module(self, *a, **k)
        files.append(module.__file__)
        return module

    with torch.compiler.config.patch(force_disable_caches=True), \
            inductor_config.patch(cpp_wrapper=False), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(GraphLowering, "compile_to_module", keep)
        run(*args)
    return [open(f).read() for f in files]


def test_position_gram_norm_compiles_without_nested_parallel_regions(monkeypatch):
    """The position-Gram norm sums the Gram's kernel windows and its product with the output
    Gram in one reduction per sample. Summed over the offsets first, Inductor's CPU backend
    opened an OpenMP region for every 9-offset sum inside a serial loop over the position pairs
    (40 ms of the benchmark CNN's 170 ms step)."""
    monkeypatch.setattr(conv_rules, "conv_strategy",
                        lambda *args: (Strategy.GHOST_GRAM, 1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 8 * 8, 3))
    x, y = torch.randn(8, 8, 8, 8), torch.randint(0, 3, (8,))
    bk = fx_bk.transform(model, max_grad_norm=0.3)
    run = torch.compile(bk, fullgraph=True)
    code = _generated_code(lambda: nn.functional.cross_entropy(run(x), y).backward())
    assert any("ghost_norm" in c or "as_strided" in c for c in code)
    nested = [line for c in code for line in c.splitlines()
              if line.startswith(" " * 12) and line.strip() == "#pragma omp parallel"]
    assert not nested
    (program,) = bk.programs
    assert {s.strategy for s in program.prog.sites if s.rule.name == "conv"} == {
        Strategy.GHOST_GRAM}
