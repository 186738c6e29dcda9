"""``fx_bk::clipped_conv_weight_grad``: a ghost convolution site's clipped weight gradient.

``x: [B, Cin, *S]`` (the convolution's input), ``g: [B, Cout, *S']`` (its output gradient),
``c: [B]`` -> ``[*W]`` (contiguous), ``sum_i c_i W(x_i, g_i)``: the convolution's own
weight-gradient kernel (``aten.convolution_backward``, as autograd runs it) on the batch with
the clip factors on whichever operand has fewer elements per sample (the weight gradient is
bilinear in ``x`` and ``g``). A sample with ``c_i = 0`` must add exactly zero, and ``0 * NaN``
is NaN: both operands are masked then, on CPU only in a step that has such a sample (as
``fx_bk::clipped_gemm``, whose scaling this shares), elsewhere always.

Opaque on purpose. In the graph, each site's scaling and mask were pointwise kernels that also
recomputed the clip factors from the norms and fused differently at every site (the benchmark
CNN's backward: 20 distinct C++ kernels, each compiled on its own at the first call), and the
mask of the unscaled operand was a pass over it at every step.

The result is contiguous whatever the inputs' layout (the weight gradient of channels-last
inputs is channels last on CPU; the fake tensor cannot know which layout Inductor passes): a
copy of one weight-sized tensor at most.
"""

from __future__ import annotations

import torch

from .clipped_gemm import masked_if_skipped, scale_goes_to_g, scaled_samples
from .conv_grad import weight_grad_flops
from .flops import register_flops

aten = torch.ops.aten


def _clipped_conv_weight_grad(x, g, c, weight_shape, stride, padding, dilation, transposed,
                              output_padding, groups):
    if scale_goes_to_g(x, g):
        g = scaled_samples(g, c)
    else:
        x = scaled_samples(x, c)
    x, g = masked_if_skipped(c, x, g)
    weight = g.new_empty(1).expand(weight_shape)  # only its shape is read
    w = aten.convolution_backward(g, x, weight, None, stride, padding, dilation, transposed,
                                  output_padding, groups, [False, True, False])[1]
    return w.contiguous()


def _fake(x, g, c, weight_shape, stride, padding, dilation, transposed, output_padding, groups):
    torch._check(x.shape[0] == g.shape[0] and c.shape[0] == x.shape[0])
    return g.new_empty(weight_shape)


_LIB = torch.library.Library("fx_bk", "FRAGMENT")
_LIB.define(
    "clipped_conv_weight_grad(Tensor x, Tensor g, Tensor c, int[] weight_shape, int[] stride, "
    "int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups) -> Tensor",
    tags=(torch.Tag.flexible_layout,))
_LIB.impl("clipped_conv_weight_grad", _clipped_conv_weight_grad, "CompositeExplicitAutograd")
torch.library.register_fake("fx_bk::clipped_conv_weight_grad", _fake, lib=_LIB)
clipped_conv_weight_grad = torch.ops.fx_bk.clipped_conv_weight_grad.default


def _flops(x_shape, g_shape, c_shape, weight_shape, stride, padding, dilation, transposed,
           output_padding, groups, **kwargs) -> int:
    """The weight gradient's multiply-adds (the scaling is elementwise)."""
    return weight_grad_flops(x_shape, g_shape, weight_shape, transposed)


register_flops(torch.ops.fx_bk.clipped_conv_weight_grad, _flops)
