"""GroupNorm, RMSNorm and InstanceNorm: ``s = x_hat * w (+ b)``, per-channel/feature affine.

Per-sample gradients are as small as the parameters, so they are instantiated:
``w_i = sum g_i * x_hat_i``, ``b_i = sum g_i`` over the dims the parameter is broadcast along
(``x_hat`` is recomputed without the affine transform); norm ``||w_i||^2 + ||b_i||^2``.
* group_norm / instance_norm: ``x: [B, C, *S]``, params ``[C]``: sum over ``S``.
* rms_norm: ``x: [B, *, *N]``, weight ``N``: sum over the dims between batch and ``N``.
Instance norm with running statistics updates buffers in place and is rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Rule, affine_per_sample_grads, register_rule

aten = torch.ops.aten


@register_rule(aten.group_norm.default)
class GroupNormRule(Rule):
    name = "group_norm"
    param_args = ("weight", "bias")
    tensor_args = ("input",)
    strategies = "instantiated (weight and/or bias)"

    def per_sample_grads(self, value):
        x, args = value.tensors["input"], value.site.const_args
        x_hat = F.group_norm(x, args["num_groups"], None, None, args.get("eps", 1e-5))
        return affine_per_sample_grads(value, x_hat, tuple(range(2, x.dim())))


@register_rule(aten.instance_norm.default)
class InstanceNormRule(Rule):
    name = "instance_norm"
    param_args = ("weight", "bias")
    tensor_args = ("input",)
    strategies = "instantiated (weight and/or bias); no running statistics"

    def validate(self, site):
        if not site.const_args.get("use_input_stats", True):
            return "instance norm with running statistics in eval mode is not supported"
        return None

    def per_sample_grads(self, value):
        x, args = value.tensors["input"], value.site.const_args
        x_hat = F.instance_norm(x, eps=args.get("eps", 1e-5))
        return affine_per_sample_grads(value, x_hat, tuple(range(2, x.dim())))


@register_rule(aten.rms_norm.default)
class RMSNormRule(Rule):
    name = "rms_norm"
    param_args = ("weight",)
    tensor_args = ("input",)
    strategies = "instantiated"

    def per_sample_grads(self, value):
        x, args = value.tensors["input"], value.site.const_args
        shape = list(args["normalized_shape"])
        x_hat = F.rms_norm(x, shape, None, args.get("eps"))
        return affine_per_sample_grads(value, x_hat, tuple(range(1, x.dim() - len(shape))))
