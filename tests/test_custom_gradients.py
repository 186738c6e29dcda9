"""Gradients the trace cannot see are rejected, never silently replaced: custom
``autograd.Function`` backwards (reentrant checkpointing's included: it runs its forward without
grad), tensor hooks and module backward hooks; data-dependent control flow is named.
Non-reentrant activation checkpointing keeps working, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

import fx_bk
import fx_bk.testing


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class TwoLayers(nn.Module):
    def __init__(self, middle=None):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.middle = middle or (lambda h: h)

    def forward(self, x):
        return self.b(self.middle(self.a(x)))


def _hooked(h):
    h.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    return h


def _reject(model, match):
    with pytest.raises(fx_bk.UnsupportedModelError, match=match):
        fx_bk.transform(model, max_grad_norm=1.0)(torch.randn(3, 4))


def test_custom_autograd_function_is_rejected():
    _reject(TwoLayers(GradientReversal.apply),  # bound before the trace, as is common
            r"custom autograd.Function .*GradientReversal changes gradients")


def test_tensor_hook_in_forward_is_rejected():
    _reject(TwoLayers(_hooked), r"a tensor hook \(Tensor.register_hook, File .*, in _hooked\)")


def test_module_backward_hook_is_rejected():
    model = TwoLayers()
    model.a.register_full_backward_hook(lambda mod, grad_in, grad_out: None)
    _reject(model, "a backward hook on module 'a'")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h if h.sum() > 0 else -h


def test_data_dependent_control_flow_names_the_line():
    _reject(Branchy(), r"\[data-dependent\] .*line \d+, in forward\)")


def test_reentrant_checkpointing_is_rejected_with_the_fix():
    model = TwoLayers(lambda h: checkpoint.checkpoint(torch.tanh, h, use_reentrant=True))
    _reject(model, "CheckpointFunction .*use use_reentrant=False")


def test_non_reentrant_checkpointing_is_exact():
    torch.manual_seed(0)
    model = TwoLayers().double()
    model.forward = lambda x: model.b(checkpoint.checkpoint(model.a, x, use_reentrant=False))
    x = torch.randn(5, 4, dtype=torch.float64)
    err = fx_bk.testing.assert_matches_per_sample(
        model, F.cross_entropy, (x, torch.randint(0, 3, (5,))), max_grad_norm=0.1)
    assert err <= 1e-10
