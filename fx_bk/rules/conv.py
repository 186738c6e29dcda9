"""Convolution (1-D, 2-D, 3-D; stride, padding incl. "same"/"valid", dilation, groups).

im2col turns the conv into a Linear per group: ``a: [B, L, Cin/g * K]`` (L output positions,
K kernel elements), ``g: [B, L, Cout/g]``, weight per group ``[Cout/g, Cin/g * K]``; then the
Linear formulas apply group by group:

* ghost:        ``||G_i||^2 = sum_groups sum(a_i a_i^T * g_i g_i^T)``, cost about
                g L^2 (Cin/g K + Cout/g) / 2 (``fx_bk::ghost_norm``: symmetric blocks)
* ghost from position Grams (no im2col): ``(a_i a_i^T)[l, l'] = sum_k P_i[pos(l) + k,
                pos(l') + k]`` with ``P_i`` the Gram of the padded input's P positions
                (``[P, P]``, Cin/g channels), so ``a a^T`` is K strided windows of ``P`` summed:
                cost g (P^2 Cin/g + L^2 (Cout/g + K)) (:func:`position_gram_norm`); with stride 1
                P is about L, K times fewer multiply-adds than im2col's Gram and no ``[L, Cin K]``
                copy of the input
* instantiate:  ``G_i = g_i^T a_i`` per group                        cost g L (Cout/g)(Cin/g K)
* clipped:      ``sum_i c_i G_i`` (``einsum(c, G)`` when instantiated)
* bias:         ``b_i = sum_l g_il``.

Only the ghost norm needs im2col's ``a``. The weight gradients themselves are computed by the
convolution's own weight-gradient kernel (``aten.convolution_backward``, as autograd does for the
non-private step), which never materialises ``a``: the clipped sum is the weight gradient of
``c * g`` (or of ``c * x`` against ``g``, whichever is smaller). The per-sample gradients ``G``
come from ``fx_bk::conv_per_sample_weight_grad``: for ungrouped convolutions on CPU, one batched
GEMM per kernel tap against shifted views of the padded input (stride 1, large windows), or
chunks of samples' im2col windows against their output gradients by one batched GEMM; otherwise
the weight gradient of one convolution with ``b * groups`` groups over a chunk folded into the
channels. The cost model (``conv_strategy``) picks the cheapest of the three strategies per
site. im2col + batched GEMM remain the path for asymmetric padding (``padding="same"`` with an
even kernel), which ``convolution_backward`` cannot express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fx_bk.cost_model import conv_strategy
from fx_bk.kernels.clipped_conv import clipped_conv_weight_grad
from fx_bk.kernels.conv_grad import (
    conv_per_sample_weight_grad,
    from_storage_order,
    storage_view,
)
from fx_bk.kernels.ghost_norm import ghost_norm
from fx_bk.kernels.rounding_bound import guard_norm_sq
from fx_bk.site import Strategy

from .base import (
    Rule,
    accumulation_dtype,
    keep_samples,
    register_rule,
    scale_samples,
)
from .pool import instantiated_norm, instantiated_sum

aten = torch.ops.aten


@dataclass
class ConvState:
    """What a convolution site's clipped sum needs."""

    bias: torch.Tensor | None = None  # [B, Cout] per-sample bias gradients
    per_sample_weight: torch.Tensor | None = None  # [B, *W] when instantiated
    storage_order: bool = False  # per_sample_weight is [B, Cout, *K, Cin] (the op's storage)


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


def _zero_pad(x: torch.Tensor, pads, first: int = 2) -> torch.Tensor:
    """Zero padding of the spatial dims, dims ``first`` on (``pads``: ``(left, right)`` per
    spatial dim): ``x`` written into a zero tensor by one ``slice_scatter`` per padded dim,
    which Inductor lowers to one fused kernel (``F.pad`` and ``constant_pad_nd`` specialize the
    batch size when traced with a symbolic batch, measured on torch 2.13; a concatenation of
    zero blocks compiles to one kernel per block). Functional: the joint trace needs no
    functionalization for it."""
    padded = [i for i, (left, right) in enumerate(pads) if left or right]
    if not padded:
        return x

    def write(src: torch.Tensor, dims: list[int]) -> torch.Tensor:
        """``src`` padded along ``dims`` (spatial dims, outermost first)."""
        i, left = dims[0], pads[dims[0]][0]
        shape = list(src.shape)
        for j in dims:
            shape[first + j] += pads[j][0] + pads[j][1]
        inner = src if len(dims) == 1 else write(src, dims[1:])
        n = src.shape[first + i]
        return torch.slice_scatter(src.new_zeros(shape), inner, first + i, left, left + n)

    return write(x, padded)


def im2col(x: torch.Tensor, site, grid=None, kernel_major: bool = False) -> torch.Tensor:
    """``[B, C, *S] -> [B, L, C * K]`` (channel-major, then kernel positions), with the kernel,
    stride, padding and dilation of ``site``; ``grid`` keeps only the first ``grid[i]`` window
    positions of each spatial dim (``L = prod(grid)``). ``kernel_major``: columns ordered
    ``K * C`` instead, channels innermost as in the channels-last tensors Inductor gives
    convolutions on CPU (only where the column order is free: a Gram of the rows)."""
    kernel, stride, dilation, pads, _ = _geometry(site)
    n = len(kernel)
    x = _zero_pad(x, pads)
    for i in range(n):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    x = x[(Ellipsis, *[slice(None, None, d) for d in dilation])]  # [B, C, *O, *K]
    if grid is not None:
        x = x[(slice(None), slice(None), *[slice(None, o) for o in grid])]
    b, c = x.shape[0], x.shape[1]
    if kernel_major:
        x = x.permute(0, *range(2, 2 + n), *range(2 + n, 2 + 2 * n), 1)  # [B, *O, *K, C]
    else:
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))  # [B, *O, C, *K]
    return x.reshape(b, -1, c * math.prod(kernel))


def conv_weight_grad(x: torch.Tensor, g: torch.Tensor, site, c: torch.Tensor | None = None,
                     transposed: bool = False) -> torch.Tensor | None:
    """The weight gradient of the site's (transposed) convolution for input ``x`` and output
    gradient ``g``: per sample (``[B, *W]``, ``fx_bk::conv_per_sample_weight_grad``), or with
    clip factors ``c`` their clipped sum ``sum_i c_i W(x_i, g_i)`` (``[*W]``,
    ``fx_bk::clipped_conv_weight_grad``). ``None`` when the geometry has asymmetric
    padding."""
    kernel, stride, dilation, pads, groups = _geometry(site)
    if any(left != right for left, right in pads):
        return None
    out_pad = _tuple(site.const_args.get("output_padding", 0), len(kernel)) if transposed else (
        (0,) * len(kernel))
    shape = list(site.shapes["weight"])
    geometry = (list(stride), [left for left, _ in pads], list(dilation), transposed,
                list(out_pad), groups)
    if c is None:
        return conv_per_sample_weight_grad(x, g, shape, *geometry)
    return clipped_conv_weight_grad(x, g, c, shape, *geometry)


def positions_by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, C, *S] -> [B, groups, L, C/groups]`` (L = prod(S))."""
    b, c = t.shape[0], t.shape[1]
    t = t.reshape(b, c, -1).transpose(1, 2)  # [B, L, C]
    return t.reshape(b, t.shape[1], groups, -1).transpose(1, 2)


def read_positions(site, grid) -> list[int]:
    """Per spatial dim, how many positions of the padded windowed tensor the ``grid`` windows
    read: all up to the last window's end, or every ``stride``-th one for a 1-wide kernel."""
    kernel, stride, dilation, _, _ = _geometry(site)
    return [n if k == 1 else s * (n - 1) + d * (k - 1) + 1
            for k, s, d, n in zip(kernel, stride, dilation, grid)]


def position_gram_norm(windowed: torch.Tensor, plain: torch.Tensor, site, grid) -> torch.Tensor:
    """``sum_groups <a_i a_i^T, q_i q_i^T>`` per sample, ``a = im2col(windowed)`` over the
    ``grid`` windows and ``q`` = ``plain``'s positions, without im2col: ``(a a^T)[l, l']`` is
    the sum over kernel offsets ``k`` of the Gram ``P`` of the padded windowed tensor's positions
    at ``(pos(l) + k, pos(l') + k)``, so ``P`` ([P, P] per sample and group) is built once and
    each offset reads a strided window of it; through ``rounding_bound.guard_norm_sq``. ``[B]``.
    The padded copy is built channels last (``[B, *P, C]``), the layout Inductor gives
    convolution inputs on CPU: padded channel-major, its kernel gathered the input element by
    element (2 ms of the benchmark CNN's step for a ``[64, 128, 10, 10]`` copy)."""
    kernel, stride, dilation, pads, groups = _geometry(site)
    n = len(kernel)
    x = _zero_pad(windowed.permute(0, *range(2, 2 + n), 1), pads, first=1)  # [B, *P, C]
    used = read_positions(site, grid)
    x = x[(slice(None), *[  # the read positions only (1-wide kernels: strided)
        slice(0, s * (m - 1) + 1, s) if k == 1 else slice(0, u)
        for k, s, m, u in zip(kernel, stride, grid, used)])]
    steps = [1 if k == 1 else s for k, s in zip(kernel, stride)]
    b, spatial, c = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
    xs = x.reshape(b, math.prod(spatial), groups, c // groups).transpose(1, 2)  # [B, g, P, C/g]
    gram = (xs @ xs.transpose(-1, -2)).reshape(b, groups, *spatial, *spatial)
    qs = positions_by_group(plain, groups)  # [B, g, L, Cout/g]
    q = (qs @ qs.transpose(-1, -2)).reshape(b, groups, *grid, *grid)
    # one reduction per sample over offsets and position pairs: summing the offsets first made
    # Inductor's CPU backend parallelize each 9-element sum over threads inside a serial loop
    # over every position pair (one OpenMP region per pair: 40 ms of the benchmark CNN's step)
    windows = kernel_windows(gram, kernel, dilation, steps, grid)  # [B, g, *K, *grid, *grid]
    q = q.reshape(b, groups, *[1] * n, *grid, *grid)
    norm_sq = (windows * q).sum(tuple(range(1, windows.dim())))
    # S = sum_l ||im2col row l|| ||q_l||, a row's squared norm the window sum of its positions'
    acc = accumulation_dtype(xs)
    sq = xs.to(acc).pow(2).sum(-1).reshape(b * groups, 1, *spatial)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d,
            torch.nn.functional.conv3d)[n - 1]
    rows = conv(sq, sq.new_ones((1, 1, *kernel)), stride=steps, dilation=dilation)
    bound = (rows.reshape(b, groups, -1).sqrt()
             * torch.linalg.vector_norm(qs.to(acc), dim=-1)).sum((1, 2))
    length = xs.shape[-1] + qs.shape[-1] + math.prod(kernel)
    return guard_norm_sq(norm_sq, bound, xs.dtype, length)


def kernel_windows(gram: torch.Tensor, kernel, dilation, steps, grid) -> torch.Tensor:
    """``[B, g, *P, *P]`` (a contiguous Gram of positions) -> ``[B, g, *K, *grid, *grid]``:
    for kernel offset ``k``, the entries ``(pos(l) + k, pos(l') + k)``, ``pos(l) = l * step``,
    one strided view: the offset moves along both position axes at once (one traced op where
    slicing takes one per dim and offset)."""
    n = len(kernel)
    strides = gram.stride()
    row, col = strides[2 : 2 + n], strides[2 + n :]
    return gram.as_strided(
        (*gram.shape[:2], *kernel, *grid, *grid),
        (*strides[:2], *[d * (r + c) for d, r, c in zip(dilation, row, col)],
         *[st * r for st, r in zip(steps, row)], *[st * c for st, c in zip(steps, col)]),
    )


@register_rule(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
               aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
class ConvRule(Rule):
    rows_independent = True  # one image per row of dim 0
    name = "conv"
    param_args = ("weight", "bias")
    strategies = ("ghost (from the Grams of positions, or of im2col rows) or instantiated "
                  "(batched GEMMs over im2col windows on CPU, else one grouped weight-gradient "
                  "convolution), by the cost model per site; bias instantiated")
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

    @staticmethod
    def grid(site) -> tuple[int, ...]:
        """The window positions: the output's spatial shape."""
        return tuple(site.shapes["out"][2:])

    def plan(self, sites):
        (s,) = sites
        groups, positions, k, p = self.sizes(s)
        if "weight" not in s.params:
            s.strategy, s.cost = Strategy.BIAS_ONLY, math.prod(s.shapes["out"][1:])
        else:
            kernel = math.prod(s.shapes["weight"][2:])
            grid = self.grid(s)
            windowed = (None if any(not isinstance(n, int) for n in grid)
                        else math.prod(read_positions(s, grid)))
            s.strategy, cost = conv_strategy(positions, k // kernel, p, kernel, windowed)
            s.cost = groups * cost

    @staticmethod
    def _grouped(value):
        """a: [B, g, L, Cin/g K] (im2col of the input), g: [B, g, L, Cout/g] (output grad)."""
        groups = _geometry(value.site)[4]
        a = im2col(value.tensors["input"], value.site)
        a = a.reshape(a.shape[0], a.shape[1], groups, -1).transpose(1, 2)
        return a, positions_by_group(value.grad, groups)

    def _ghost_operands(self, value):
        """``_grouped``'s ``(a, g)`` for the im2col ghost norm. ``a a^T`` does not depend on the
        order of ``a``'s columns, so an ungrouped convolution's im2col is kernel-major (channels
        innermost, read contiguously from channels-last input; channel-major, Inductor's CPU
        code gathered it element by element)."""
        if self.is_transposed(value.site) or _geometry(value.site)[4] != 1:
            return self._grouped(value)
        a = im2col(value.tensors["input"], value.site, kernel_major=True)
        return a.unsqueeze(1), positions_by_group(value.grad, 1)

    @staticmethod
    def _gram_operands(value):
        """The windowed tensor (the input) and the other one (the output gradient)."""
        return value.tensors["input"], value.grad

    def norm_sq(self, values):
        (value,) = values
        site, state = value.site, ConvState()
        norm = torch.zeros((), dtype=value.grad.dtype, device=value.grad.device)
        if "bias" in site.params:
            state.bias = value.grad.reshape(*value.grad.shape[:2], -1).sum(2)  # [B, Cout]
            norm = norm + instantiated_norm(state.bias)
        if "weight" in site.params:
            if site.strategy == Strategy.GHOST:  # per (sample, group), blocked symmetric Gram
                a, g = self._ghost_operands(value)
                b, groups = a.shape[0], a.shape[1]
                per_group = ghost_norm(a.detach().reshape(b * groups, *a.shape[2:]),
                                       g.detach().reshape(b * groups, *g.shape[2:]))
                norm = norm + per_group.reshape(b, groups).sum(1).to(norm.dtype)
            elif site.strategy == Strategy.GHOST_GRAM:
                windowed, plain = self._gram_operands(value)
                norm = norm + position_gram_norm(windowed.detach(), plain.detach(), site,
                                                 self.grid(site)).to(norm.dtype)
            else:
                w, state.storage_order = self._per_sample_weight(value)
                # reduced in the op's storage order (in W's order the reductions stride across
                # the storage: measured on the benchmark CNN, 64 -> 64 channels, a scalar loop)
                state.per_sample_weight = storage_view(w) if state.storage_order else w
                norm = norm + instantiated_norm(state.per_sample_weight)
        return norm, state

    def clipped_grads(self, values, state: ConvState, c):
        (value,) = values
        site = value.site
        out = {}
        if state.bias is not None:
            out[site.params["bias"]] = instantiated_sum(c, state.bias)
        if "weight" in site.params:
            shape = site.shapes["weight"]
            if state.per_sample_weight is not None:
                w = instantiated_sum(c, state.per_sample_weight)
                if state.storage_order:
                    w = from_storage_order(w)
            else:
                w = conv_weight_grad(value.tensors["input"], value.grad, site, c,
                                     transposed=self.is_transposed(site))
                if w is None:  # im2col path: one batched GEMM over the groups
                    a, g = self._grouped(value)
                    a = keep_samples(c, a)
                    cg = scale_samples(c, g)  # NaN-safe: skipped samples add exactly zero
                    groups = a.shape[1]
                    lhs = cg.permute(1, 3, 0, 2).reshape(groups, g.shape[-1], -1)  # [g, p, B L]
                    rhs = a.permute(1, 0, 2, 3).reshape(groups, -1, a.shape[-1])  # [g, B L, k]
                    w = lhs @ rhs
            out[site.params["weight"]] = w.reshape(shape)
        return out

    def _per_sample_weight(self, value) -> tuple[torch.Tensor, bool]:
        """``([B, *W], from_op)``: by the convolution's weight-gradient kernel
        (``from_op``: the op's result, whose storage is ``[B, Cout, *K, Cin]``,
        ``storage_view``), else im2col + GEMM in ``W``'s layout. Under autocast the op reads the
        operands in the dtype the convolution computed in, as AMP's own weight gradient (float32
        accumulation, a result in that dtype), widened after: the norms and the clipped sum are
        both computed from those widened values."""
        w = conv_weight_grad(value.operand("input"), value.operand("grad"), value.site,
                             transposed=self.is_transposed(value.site))
        if w is not None:
            return w.to(value.grad.dtype), True
        a, g = self._grouped(value)
        G = g.transpose(-1, -2) @ a  # [B, g, Cout/g, Cin/g K] in W's layout
        return G.reshape(G.shape[0], *value.site.shapes["weight"]), False

    def per_sample_grads(self, value):
        site, out = value.site, {}
        if "bias" in site.params:
            out[site.params["bias"]] = value.grad.reshape(*value.grad.shape[:2], -1).sum(2)
        if "weight" in site.params:
            out[site.params["weight"]] = self._per_sample_weight(value)[0]
        return out
