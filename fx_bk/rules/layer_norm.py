"""LayerNorm: ``s = x_hat * w + b``, ``x: [B, *, *N]`` normalized over the last dims ``N``.

Per-sample gradients are as small as the parameters, so they are instantiated:
``w_i = sum_* g_i * x_hat_i``, ``b_i = sum_* g_i`` (sum over the non-batch, non-normalized dims),
norm ``||w_i||^2 + ||b_i||^2``, clipped ``sum_i c_i w_i`` (``x_hat`` is recomputed without affine).
"""

from __future__ import annotations

import torch

from . import Rule, affine_per_sample_grads, register_rule

aten = torch.ops.aten


@register_rule(aten.layer_norm.default)
class LayerNormRule(Rule):
    name = "layer_norm"
    param_args = ("weight", "bias")
    strategies = "instantiated (weight and/or bias)"
    tensor_args = ("input",)

    def per_sample_grads(self, value):
        x = value.tensors["input"]
        shape = list(value.site.const_args["normalized_shape"])
        eps = value.site.const_args.get("eps", 1e-5)
        dims = tuple(range(1, x.dim() - len(shape)))  # positions between batch and normalized
        x_hat = torch.nn.functional.layer_norm(x, shape, None, None, eps)
        return affine_per_sample_grads(value, x_hat, dims)
