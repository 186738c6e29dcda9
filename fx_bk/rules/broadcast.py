"""A bare ``nn.Parameter`` used directly in a broadcasting op (position embedding, scale,
cls token): ``s = x + p``, ``s = x - p``, ``s = x * p``, ``s = p.expand(B, ...)``.

``s: [B, *S]``; ``p`` is broadcast against ``S`` (right-aligned; a leading dim of size 1 may sit
under the batch). Per sample, the gradient is the site's vjp summed over every broadcast dim:

* add / sub / expand: ``p_i = sum_broadcast(±alpha g_i)``
* mul:                ``p_i = sum_broadcast(g_i * x_i)``

instantiated (``[B, *p.shape]``, as small as the parameter times B).
"""

from __future__ import annotations

import torch

from .base import Rule, register_rule

aten = torch.ops.aten


def reduce_to_param(h: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``h: [B, *S]`` summed to the per-sample gradient ``[B, *shape]`` of a broadcast param."""
    b, rest = h.shape[0], h.dim() - 1
    inner = shape[1:] if len(shape) == h.dim() else shape  # a leading param dim under the batch
    target = (b, *([1] * (rest - len(inner))), *inner)
    return h.sum_to_size(target).reshape(b, *shape)


class _BroadcastRule(Rule):
    param_args = ("input", "other")
    strategies = "instantiated (vjp summed over the broadcast dims)"
    folds_batch = True  # elementwise: the dims the parameter is broadcast along are rows

    def row_role(self, site):
        """The batched operand (the other one is the parameter)."""
        return next((r for r in ("input", "other") if r not in site.params), "input")

    def core_dims(self, site):
        """The parameter's dims, leading size-1 dims aside (they broadcast too)."""
        dims = [list(site.shapes.get(r, ())) for r in site.params]
        return max((len(d) - next((i for i, n in enumerate(d) if n != 1), len(d))
                    for d in dims), default=0)

    def _vjp(self, value, role: str) -> torch.Tensor:
        """The op's vjp w.r.t. the argument in ``role``, before the broadcast is summed."""
        raise NotImplementedError

    def per_sample_grads(self, value):
        return {
            name: reduce_to_param(self._vjp(value, role), value.site.shapes[role])
            for role, name in value.site.params.items()
        }


@register_rule(aten.add.Tensor, aten.sub.Tensor, aten.add_.Tensor, aten.sub_.Tensor)
class BroadcastAddRule(_BroadcastRule):
    """Out of place, or in place on an activation (``x += self.bias``, ConvBERT): the op's
    output is then the updated activation (later in-place ops on it and on the activation
    before it are handled by ``passes/emit_aux_outputs.py``)."""

    name = "broadcast_add"
    tensor_args = ()

    def _vjp(self, value, role):
        alpha = value.site.const_args.get("alpha", 1)
        minus = value.site.op in (aten.sub.Tensor, aten.sub_.Tensor)
        sign = -1 if minus and role == "other" else 1
        scale = sign * (alpha if role == "other" else 1)
        return value.grad if scale == 1 else value.grad * scale


@register_rule(aten.mul.Tensor, aten.mul_.Tensor)
class BroadcastMulRule(_BroadcastRule):
    name = "broadcast_mul"
    tensor_args = ("input", "other")

    def validate(self, site):
        if len(site.params) != 1:
            return "a product of two trainable parameters has no per-sample rule"
        return None

    def _vjp(self, value, role):
        other = "other" if role == "input" else "input"
        return value.grad * value.tensors[other]


@register_rule(aten.expand.default)
class ExpandRule(_BroadcastRule):
    name = "expand"
    param_args = ("input",)
    tensor_args = ()
    folds_batch = False

    def _vjp(self, value, role):
        return value.grad
