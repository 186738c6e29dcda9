"""LayerNorm: ``s = x_hat * w + b``, ``x: [B, *, *N]`` normalized over the last dims ``N``.

Per-sample gradients are as small as the parameters, so they are instantiated:
``w_i = sum_* g_i * x_hat_i``, ``b_i = sum_* g_i`` (sum over the non-batch, non-normalized dims),
norm ``||w_i||^2 + ||b_i||^2``, clipped ``sum_i c_i w_i`` (``x_hat`` is recomputed without affine).
"""

from __future__ import annotations

import torch

from . import Rule, register_rule

aten = torch.ops.aten


@register_rule(aten.layer_norm.default)
class LayerNormRule(Rule):
    name = "layer_norm"
    param_args = ("weight", "bias")
    strategies = "instantiated (weight and/or bias)"
    tensor_args = ("input",)

    def per_sample_grads(self, value):
        x, g = value.tensors["input"], value.grad
        shape = list(value.site.const_args["normalized_shape"])
        eps = value.site.const_args.get("eps", 1e-5)
        dims = tuple(range(1, x.dim() - len(shape)))  # positions between batch and normalized
        out = {}
        if "weight" in value.site.params:
            x_hat = torch.nn.functional.layer_norm(x, shape, None, None, eps)
            w = g * x_hat
            out[value.site.params["weight"]] = w.sum(dims) if dims else w
        if "bias" in value.site.params:
            out[value.site.params["bias"]] = g.sum(dims) if dims else g
        return out
