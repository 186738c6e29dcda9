"""Convolution (1-D, 2-D, 3-D; stride, padding incl. "same"/"valid", dilation, groups).

im2col turns the conv into a Linear per group: ``a: [B, L, Cin/g * K]`` (L output positions,
K kernel elements), ``g: [B, L, Cout/g]``, weight per group ``[Cout/g, Cin/g * K]``; then the
Linear formulas apply group by group:

* ghost:        ``||G_i||^2 = sum_groups sum(a_i a_i^T * g_i g_i^T)``, cost about
                g L^2 (Cin/g K + Cout/g) / 2 (``fx_bk::ghost_norm``: symmetric blocks)
* instantiate:  ``G_i = g_i^T a_i`` per group                        cost g L (Cout/g)(Cin/g K)
* clipped:      ``sum_i c_i G_i`` (``einsum(c, G)`` when instantiated)
* bias:         ``b_i = sum_l g_il``.

Only the ghost norm needs im2col's ``a``. The weight gradients themselves are computed by the
convolution's own weight-gradient kernel (``aten.convolution_backward``, as autograd does for the
non-private step), which never materialises ``a``: the clipped sum is the weight gradient of
``c * g`` (or of ``c * x`` against ``g``, whichever is smaller), and the per-sample gradients
``G`` of B samples are the weight gradient of one convolution with ``B * groups`` groups over the
batch folded into the channels (``x: [1, B Cin, *S]``, ``g: [1, B Cout, *S']``). im2col +
batched GEMM remain the path for asymmetric padding (``padding="same"`` with an even kernel),
which ``convolution_backward`` cannot express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fx_bk.cost_model import gemm_strategy
from fx_bk.kernels.ghost_norm import ghost_norm
from fx_bk.site import Strategy

from .base import (
    Rule,
    keep_samples,
    register_rule,
    scale_samples,
    squared_norm,
    weighted_sum,
)
from .linear import scale_smaller

aten = torch.ops.aten


@dataclass
class ConvState:
    """What a convolution site's clipped sum needs."""

    bias: torch.Tensor | None = None  # [B, Cout] per-sample bias gradients
    per_sample_weight: torch.Tensor | None = None  # [B, *W] when instantiated
    a: torch.Tensor | None = None  # ghost: [B, groups, L, Cin/g K] (im2col)
    g: torch.Tensor | None = None  # ghost: [B, groups, L, Cout/g]


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _geometry(site):
    """kernel, stride, dilation, pads [(left, right) per spatial dim], groups."""
    kernel = site.shapes["weight"][2:]
    n = len(kernel)
    args = site.const_args
    stride, dilation = _tuple(args.get("stride", 1), n), _tuple(args.get("dilation", 1), n)
    padding = args.get("padding", 0)
    if padding == "valid":
        pads = [(0, 0)] * n
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in _tuple(padding, n)]
    return kernel, stride, dilation, pads, args.get("groups", 1)


def _zero_pad(x: torch.Tensor, pads) -> torch.Tensor:
    """Zero padding of the spatial dims by concatenation (``F.pad`` specializes the batch size
    when traced with a symbolic batch: measured on torch 2.13)."""
    for i, (left, right) in enumerate(pads):
        dim = 2 + i
        parts = []
        for width in (left, right):
            shape = list(x.shape)
            shape[dim] = width
            parts.append(x.new_zeros(shape))
        if left or right:
            x = torch.cat([parts[0], x, parts[1]], dim)
    return x


def im2col(x: torch.Tensor, site, grid=None) -> torch.Tensor:
    """``[B, C, *S] -> [B, L, C * K]`` (channel-major, then kernel positions), with the kernel,
    stride, padding and dilation of ``site``; ``grid`` keeps only the first ``grid[i]`` window
    positions of each spatial dim (``L = prod(grid)``)."""
    kernel, stride, dilation, pads, _ = _geometry(site)
    n = len(kernel)
    x = _zero_pad(x, pads)
    for i in range(n):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    x = x[(Ellipsis, *[slice(None, None, d) for d in dilation])]  # [B, C, *O, *K]
    if grid is not None:
        x = x[(slice(None), slice(None), *[slice(None, o) for o in grid])]
    b, c = x.shape[0], x.shape[1]
    x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))  # [B, *O, C, *K]
    return x.reshape(b, -1, c * math.prod(kernel))


def conv_weight_grad(x: torch.Tensor, g: torch.Tensor, site, per_sample: bool,
                     transposed: bool = False) -> torch.Tensor | None:
    """The weight gradient of the site's (transposed) convolution for input ``x`` and output
    gradient ``g``: summed over the batch (``[*W]``), or per sample (``[B, *W]``) when
    ``per_sample``. ``None`` when the geometry has asymmetric padding."""
    kernel, stride, dilation, pads, groups = _geometry(site)
    if any(left != right for left, right in pads):
        return None
    out_pad = _tuple(site.const_args.get("output_padding", 0), len(kernel)) if transposed else (
        (0,) * len(kernel))
    shape = list(site.shapes["weight"])
    b = x.shape[0]
    if per_sample:  # the batch folded into the channels: B * groups independent groups
        x, g = x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:])
        shape[0], groups = shape[0] * b, groups * b
    weight = g.new_empty(1).expand(shape)  # only its shape is read
    w = aten.convolution_backward(
        g, x, weight, None, list(stride), [left for left, _ in pads], list(dilation),
        transposed, list(out_pad), groups, [False, True, False])[1]
    return w.reshape(b, *site.shapes["weight"]) if per_sample else w


def positions_by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, C, *S] -> [B, groups, L, C/groups]`` (L = prod(S))."""
    b, c = t.shape[0], t.shape[1]
    t = t.reshape(b, c, -1).transpose(1, 2)  # [B, L, C]
    return t.reshape(b, t.shape[1], groups, -1).transpose(1, 2)


@register_rule(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
               aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
class ConvRule(Rule):
    rows_independent = True  # one image per row of dim 0
    name = "conv"
    param_args = ("weight", "bias")
    strategies = ("ghost (im2col) or instantiated (one grouped weight-gradient convolution), by "
                  "the cost model per site; bias instantiated")
    tensor_args = ("input",)

    def is_transposed(self, site) -> bool:
        return False

    @staticmethod
    def sizes(site):
        """groups, L positions, k and p: per group ``G_i = g_i^T a_i`` is ``[p, k]`` from
        ``a_i: [L, k]``, ``g_i: [L, p]``."""
        groups = _geometry(site)[4]
        cout, cin_g, *kernel = site.shapes["weight"]
        return groups, math.prod(site.shapes["out"][2:]), cin_g * math.prod(kernel), cout // groups

    def plan(self, sites):
        (s,) = sites
        groups, positions, k, p = self.sizes(s)
        if "weight" not in s.params:
            s.strategy, s.cost = Strategy.BIAS_ONLY, math.prod(s.shapes["out"][1:])
        else:
            s.strategy, cost = gemm_strategy(positions, k, p, rank_one=False)
            s.cost = groups * cost

    @staticmethod
    def _grouped(value):
        """a: [B, g, L, Cin/g K] (im2col of the input), g: [B, g, L, Cout/g] (output grad)."""
        groups = _geometry(value.site)[4]
        a = im2col(value.tensors["input"], value.site)
        a = a.reshape(a.shape[0], a.shape[1], groups, -1).transpose(1, 2)
        return a, positions_by_group(value.grad, groups)

    def norm_sq(self, values):
        (value,) = values
        site, state = value.site, ConvState()
        norm = torch.zeros((), dtype=value.grad.dtype, device=value.grad.device)
        if "bias" in site.params:
            state.bias = value.grad.reshape(*value.grad.shape[:2], -1).sum(2)  # [B, Cout]
            norm = norm + squared_norm(state.bias)
        if "weight" in site.params:
            if site.strategy == Strategy.GHOST:  # per (sample, group), blocked symmetric Gram
                a, g = self._grouped(value)
                b, groups = a.shape[0], a.shape[1]
                per_group = ghost_norm(a.detach().reshape(b * groups, *a.shape[2:]),
                                       g.detach().reshape(b * groups, *g.shape[2:]))
                norm = norm + per_group.reshape(b, groups).sum(1).to(norm.dtype)
                state.a, state.g = a, g
            else:
                state.per_sample_weight = self._per_sample_weight(value)
                norm = norm + squared_norm(state.per_sample_weight)
        return norm, state

    def clipped_grads(self, values, state: ConvState, c):
        (value,) = values
        site = value.site
        out = {}
        if state.bias is not None:
            out[site.params["bias"]] = weighted_sum(c, state.bias)
        if "weight" in site.params:
            shape = site.shapes["weight"]
            if state.per_sample_weight is not None:
                w = weighted_sum(c, state.per_sample_weight)
            else:
                x, cg = scale_smaller(value.tensors["input"], value.grad, c)
                w = conv_weight_grad(x, cg, site, per_sample=False,
                                     transposed=self.is_transposed(site))
                if w is None:  # im2col path: one batched GEMM over the groups
                    g, a = state.g, keep_samples(c, state.a)
                    cg = scale_samples(c, g)  # NaN-safe: skipped samples add exactly zero
                    groups = a.shape[1]
                    lhs = cg.permute(1, 3, 0, 2).reshape(groups, g.shape[-1], -1)  # [g, p, B L]
                    rhs = a.permute(1, 0, 2, 3).reshape(groups, -1, a.shape[-1])  # [g, B L, k]
                    w = lhs @ rhs
            out[site.params["weight"]] = w.reshape(shape)
        return out

    def _per_sample_weight(self, value) -> torch.Tensor:
        """``[B, *W]``: by the convolution's weight-gradient kernel, else im2col + GEMM."""
        w = conv_weight_grad(value.tensors["input"], value.grad, value.site, per_sample=True,
                             transposed=self.is_transposed(value.site))
        if w is not None:
            return w
        a, g = self._grouped(value)
        G = g.transpose(-1, -2) @ a  # [B, g, Cout/g, Cin/g K] in W's layout
        return G.reshape(G.shape[0], *value.site.shapes["weight"])

    def per_sample_grads(self, value):
        site, out = value.site, {}
        if "bias" in site.params:
            out[site.params["bias"]] = value.grad.reshape(*value.grad.shape[:2], -1).sum(2)
        if "weight" in site.params:
            out[site.params["weight"]] = self._per_sample_weight(value)
        return out
