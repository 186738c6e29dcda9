"""Transposed convolution (1-D, 2-D, 3-D; stride, padding, output_padding, dilation, groups).

``y = conv_transpose(x, W)``, ``x: [B, Cin, *S]``, ``W: [Cin, Cout/g, *k]``, ``y, g: [B, Cout,
*S_out]``. It is the adjoint of the convolution ``y -> x`` with the same kernel, stride, padding,
dilation and groups: ``y[co, j] = sum_{ci, s, kk : s*stride - pad + kk*dil = j} W[ci, co, kk]
x[ci, s]``, so the weight gradient correlates the input with the output gradient:

    ``G_i[ci, co, kk] = sum_s x_i[ci, s] * g_i[co, s*stride - pad + kk*dil]
                      = sum_s x_i[ci, s] * unfold(g_i)[co, kk, s]``

where ``unfold`` is the convolution rule's im2col of ``g`` (same kernel, stride, padding,
dilation; ``g`` zero-padded by ``pad`` on both sides: the cropped outputs' terms are zero).
``output_padding`` only lengthens ``S_out`` (``(S-1) stride - 2 pad + dil (k-1) + op + 1``):
the windows of the ``S`` input positions read ``j`` in ``[-pad, S_out - 1 + pad - op]``, inside
the padded ``g``. ``unfold`` has ``S + floor(op / stride)`` windows per dim; the first ``S`` are
the input's, the others (only when ``op >= stride``, allowed with dil > stride) are dropped.

That is the convolution rule with the roles swapped, per group: ``a = unfold(g): [B, g, L,
Cout/g K]``, ``g' = x: [B, g, L, Cin/g]`` (L = prod(S) input positions), ``G_i = g'_i^T a_i:
[Cin/g, Cout/g K]`` per group, which is ``W``'s layout. Ghost ``sum(a a^T * g' g'^T)`` (cost
g L^2 (Cout/g K + Cin/g); or ``a a^T`` from the Gram of ``g``'s padded positions, see
``conv.position_gram_norm``) or instantiation (cost g L (Cin/g)(Cout/g K)), chosen per site as for
convolutions; clipped sum ``sum_i c_i G_i``; bias ``b_i = sum over output positions of g_i``.
"""

from __future__ import annotations

import math

import torch

from .base import register_rule
from .conv import ConvRule, _geometry, im2col, positions_by_group

aten = torch.ops.aten


@register_rule(aten.conv_transpose1d.default, aten.conv_transpose2d.input,
               aten.conv_transpose3d.input)
class ConvTransposeRule(ConvRule):
    name = "conv_transpose"
    strategies = ("ghost (from the Grams of the output gradient's positions, or of its im2col "
                  "rows) or instantiated (one grouped weight-gradient convolution), by the cost "
                  "model per site; bias instantiated")

    def is_transposed(self, site) -> bool:
        return True

    @staticmethod
    def sizes(site):
        groups = _geometry(site)[4]
        cin, cout_g, *kernel = site.shapes["weight"]
        positions = math.prod(site.shapes["input"][2:])
        return groups, positions, cout_g * math.prod(kernel), cin // groups

    @staticmethod
    def grid(site) -> tuple[int, ...]:
        """The window positions: the input's spatial shape."""
        return tuple(site.shapes["input"][2:])

    @staticmethod
    def _gram_operands(value):
        """The windowed tensor (the output gradient) and the other one (the input)."""
        return value.grad, value.tensors["input"]

    @staticmethod
    def _grouped(value):
        """a: [B, g, L, Cout/g K] (im2col of the output grad), g: [B, g, L, Cin/g] (input)."""
        x = value.tensors["input"]
        groups = _geometry(value.site)[4]
        a = im2col(value.grad, value.site, grid=x.shape[2:])
        a = a.reshape(a.shape[0], a.shape[1], groups, -1).transpose(1, 2)
        return a, positions_by_group(x, groups)


@register_rule(aten.convolution.default)
class ConvolutionRule(ConvTransposeRule):
    """``torch.convolution(..., transposed, output_padding, groups)`` called directly (the
    ``nn.Conv*`` / ``nn.ConvTranspose*`` modules trace to the ops above): the convolution or
    the transposed-convolution formulas, by its ``transposed`` argument."""

    name = "convolution"
    strategies = "as conv, or as conv_transpose when `transposed=True`"

    def is_transposed(self, site) -> bool:
        return bool(site.const_args.get("transposed"))

    def sizes(self, site):
        return self._formulas(site).sizes(site)

    def _grouped(self, value):
        return self._formulas(value.site)._grouped(value)

    def grid(self, site):
        return self._formulas(site).grid(site)

    def _gram_operands(self, value):
        return self._formulas(value.site)._gram_operands(value)

    @staticmethod
    def _formulas(site):
        return ConvTransposeRule if site.const_args.get("transposed") else ConvRule
