"""``fx_bk::conv_per_sample_weight_grad``: a convolution's weight gradient for every sample.

``x: [B, Cin, *S]`` (the convolution's input), ``g: [B, Cout, *S']`` (its output gradient) ->
``[B, *W]``: the convolution's own weight-gradient kernel (``aten.convolution_backward``, as
autograd runs it) on one grouped convolution over the batch folded into the channels (``x`` as
``[1, B Cin, *S]``, ``B * groups`` groups), which gives every sample's gradient at once.

Opaque on purpose. The fold is a view of contiguous tensors only, and on CPU Inductor gives
convolutions channels-last tensors: written in the graph, the fold made Inductor also write each
output gradient in the contiguous layout (a strided scatter, fused into the normalization
backward before it) besides the channels-last one the input-gradient convolution reads. Here the
inputs keep Inductor's layout and are made contiguous by ATen's copy inside the op (measured on
the benchmark's CNN, 2 CPU threads: 5% less tensor peak, the same step time). Looping over the
samples instead (a sample's slice of a channels-last tensor is channels-last, no copy) was 8-10%
slower there: one-sample convolutions keep two threads busy less well.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten


@torch.library.custom_op("fx_bk::conv_per_sample_weight_grad", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,))
def conv_per_sample_weight_grad(
    x: torch.Tensor, g: torch.Tensor, weight_shape: list[int], stride: list[int],
    padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
    groups: int,
) -> torch.Tensor:
    b = x.shape[0]
    folded = [weight_shape[0] * b, *weight_shape[1:]]
    weight = g.new_empty(1).expand(folded)  # only its shape is read
    w = aten.convolution_backward(
        g.contiguous().reshape(1, -1, *g.shape[2:]), x.contiguous().reshape(1, -1, *x.shape[2:]),
        weight, None, stride, padding, dilation, transposed, output_padding, groups * b,
        [False, True, False])[1]
    return w.reshape(b, *weight_shape)


@conv_per_sample_weight_grad.register_fake
def _fake(x, g, weight_shape, stride, padding, dilation, transposed, output_padding, groups):
    torch._check(x.shape[0] == g.shape[0])
    return g.new_empty(x.shape[0], *weight_shape)


def _flops(x_shape, g_shape, weight_shape, stride, padding, dilation, transposed,
           output_padding, groups, **kwargs) -> int:
    """2 per multiply-add: every position of the strided side (the output of a convolution,
    the input of a transposed one) meets every weight element once per sample."""
    positions = math.prod((x_shape if transposed else g_shape)[2:])
    return 2 * x_shape[0] * positions * math.prod(weight_shape)


def _register_flop_formula() -> None:
    """Lets ``FlopCounterMode`` count the op (the benchmark's arithmetic floor); idempotent."""
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
    except ImportError:
        return
    op = torch.ops.fx_bk.conv_per_sample_weight_grad
    if op not in flop_registry:
        register_flop_formula(op)(_flops)


_register_flop_formula()
