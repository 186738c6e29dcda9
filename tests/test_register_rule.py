"""``fx_bk.register_rule`` from user code: a module built on the user's own custom op gets its
own rule and is clipped exactly (vs the per-sample oracle), eager and compiled; a wrong rule is
caught by ``fx_bk.testing``; bad registrations are clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
import fx_bk.testing
from fx_bk.rules import RULES, supported_ops_table, unregister_rule


@torch.library.custom_op("fx_bk_test::scale", mutates_args=())
def scale(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x * w``, ``w: [d]`` broadcast over ``x: [B, *, d]``."""
    return x * w


@scale.register_fake
def _scale_fake(x, w):
    return torch.empty_like(x)


def _scale_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _scale_backward(ctx, g):
    x, w = ctx.saved_tensors
    return g * w, (g * x).reshape(-1, x.shape[-1]).sum(0)


scale.register_autograd(_scale_backward, setup_context=_scale_setup)
OP = torch.ops.fx_bk_test.scale.default


class ScaledMLP(nn.Module):
    """A user's layer on their own op: ``scale(fc(x), w)`` on ``[B, T, d]``."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # [B, T, d]
        return self.head(torch.tanh(scale(self.fc(x), self.w)).mean(1))


class ScaleRule(fx_bk.Rule):
    name = "fx_bk_test.scale"
    param_args = ("w",)
    tensor_args = ("x",)

    def per_sample_grads(self, value):  # value.grad = dL/ds: [B, T, d]
        g_w = (value.grad * value.tensors["x"]).flatten(1, -2).sum(1)  # [B, d]
        return {value.site.params["w"]: g_w}


class WrongScaleRule(ScaleRule):
    def per_sample_grads(self, value):
        return {k: 2 * g for k, g in super().per_sample_grads(value).items()}


@pytest.fixture
def registered():
    """Register a rule for OP for one test; the registry is restored afterwards."""
    def register(rule_cls, **kwargs):
        return fx_bk.register_rule(OP, **kwargs)(rule_cls)

    yield register
    unregister_rule(OP)
    assert OP not in RULES


def _batch(dtype, b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 6, generator=g, dtype=dtype), torch.randint(0, 3, (b,), generator=g)


def test_a_custom_op_without_a_rule_is_reported():
    model = ScaledMLP()
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"fx_bk_test\.scale.*'w'"):
        fx_bk.transform(model, max_grad_norm=1.0)(_batch(torch.float32)[0])


def test_user_rule_is_exact_eager_float64(registered):
    registered(ScaleRule)
    torch.manual_seed(0)
    model = ScaledMLP().double()
    for b, r in ((1, 0.05), (5, 0.05), (5, 1e3)):  # every sample clipped / none
        x, y = _batch(torch.float64, b, seed=b)
        err = fx_bk.testing.assert_matches_per_sample(model, F.cross_entropy, (x, y),
                                                      max_grad_norm=r)
        assert err <= 1e-10
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_user_rule_is_exact_compiled(registered):
    registered(ScaleRule)
    torch.manual_seed(0)
    model = ScaledMLP()
    x, y = _batch(torch.float32)
    err = fx_bk.testing.assert_matches_per_sample(model, F.cross_entropy, (x, y),
                                                  max_grad_norm=0.05, compile=True)
    assert err <= 1e-5


def test_a_wrong_rule_is_caught_by_the_oracle(registered):
    registered(WrongScaleRule)
    model = ScaledMLP().double()
    with pytest.raises(AssertionError, match="differs from the per-sample oracle"):
        fx_bk.testing.assert_matches_per_sample(model, F.cross_entropy,
                                                _batch(torch.float64), max_grad_norm=1e3)


def test_user_rules_stay_out_of_the_builtin_op_table(registered):
    registered(ScaleRule)
    assert "fx_bk_test" not in supported_ops_table()
    assert "fx_bk_test.scale" in supported_ops_table(builtin_only=False)


def test_registering_an_op_twice_needs_replace(registered):
    registered(ScaleRule)
    with pytest.raises(fx_bk.ConfigError, match="replace=True"):
        fx_bk.register_rule(OP)(WrongScaleRule)
    fx_bk.register_rule(OP, replace=True)(WrongScaleRule)
    assert isinstance(RULES[OP], WrongScaleRule)


def test_bad_registrations_are_clear_errors():
    with pytest.raises(fx_bk.ConfigError, match=r"op packet: use its overload, e\.g\. \.default"):
        fx_bk.register_rule(torch.ops.fx_bk_test.scale)
    with pytest.raises(fx_bk.ConfigError, match="subclass of fx_bk.Rule"):
        fx_bk.register_rule(OP)(object)
    with pytest.raises(fx_bk.ConfigError, match="needs a name"):
        fx_bk.register_rule(OP)(type("Nameless", (ScaleRule,), {"name": ""}))
    with pytest.raises(TypeError, match="abstract"):
        fx_bk.register_rule(OP)(type("NoGrads", (fx_bk.Rule,), {"name": "x"}))
    assert OP not in RULES


class FrozenScale(ScaledMLP):
    """The custom op on a buffer: no site, but its registered backward carries the gradient
    to ``fc`` (the op stays one node of the trace: its backward is honoured, not dropped)."""

    def __init__(self):
        super().__init__()
        w = self.w.detach().clone()
        del self.w
        self.register_buffer("w", w)


def test_a_custom_op_on_no_trainable_parameter_needs_no_rule():
    torch.manual_seed(0)
    model = FrozenScale().double()
    err = fx_bk.testing.assert_matches_per_sample(model, F.cross_entropy,
                                                  _batch(torch.float64), max_grad_norm=0.05)
    assert err <= 1e-10
