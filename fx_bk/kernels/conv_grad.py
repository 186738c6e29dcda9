"""``fx_bk::conv_per_sample_weight_grad``: a convolution's weight gradient for every sample.

``x: [B, Cin, *S]`` (the convolution's input), ``g: [B, Cout, *S']`` (its output gradient) ->
``[B, *W]``: the convolution's own weight-gradient kernel (``aten.convolution_backward``, as
autograd runs it) on one grouped convolution over the batch folded into the channels (``x`` as
``[1, B Cin, *S]``, ``B * groups`` groups), which gives every sample's gradient at once.

The batch goes through in chunks of samples whose inputs and output gradients hold about
``CHUNK_BYTES`` together: each chunk is made contiguous (a copy of that size, not of the whole
batch) and folded as above. Measured on the benchmark CNN's convolutions (2 CPU threads,
channels-last inputs, B = 64), against folding the whole batch at once: 32 channels at 32×32,
13.9 vs 21.4 ms; 32 -> 64 channels, stride 2, 10.0 vs 18.1 ms; 64 channels at 16×16, 14.5 vs
24.9 ms (the chunks' copies and convolutions stay in cache), and the op's own temporaries no
longer grow with the batch (36 MB of the benchmark CNN's tensor peak were one such op). Other
devices fold the whole batch at once (not measured there yet).

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

CHUNK_BYTES = 2 * 2**20  # the input and output gradient of one chunk of samples, together


@torch.library.custom_op("fx_bk::conv_per_sample_weight_grad", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,))
def conv_per_sample_weight_grad(
    x: torch.Tensor, g: torch.Tensor, weight_shape: list[int], stride: list[int],
    padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
    groups: int,
) -> torch.Tensor:
    per_sample = (x[:1].numel() * x.element_size() + g[:1].numel() * g.element_size())
    chunk = max(1, CHUNK_BYTES // max(per_sample, 1)) if x.device.type == "cpu" else x.shape[0]
    out = g.new_empty(x.shape[0], *weight_shape)
    for start in range(0, x.shape[0], chunk):
        xs, gs = x[start:start + chunk], g[start:start + chunk]
        b = xs.shape[0]
        weight = g.new_empty(1).expand(weight_shape[0] * b, *weight_shape[1:])  # shape only
        w = aten.convolution_backward(
            gs.contiguous().reshape(1, -1, *gs.shape[2:]),
            xs.contiguous().reshape(1, -1, *xs.shape[2:]),
            weight, None, stride, padding, dilation, transposed, output_padding, groups * b,
            [False, True, False])[1]
        out[start:start + b].copy_(w.reshape(b, *weight_shape))
    return out


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
