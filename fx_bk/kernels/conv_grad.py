"""``fx_bk::conv_per_sample_weight_grad``: a convolution's weight gradient for every sample.

``x: [B, Cin, *S]`` (the convolution's input), ``g: [B, Cout, *S']`` (its output gradient) ->
``[B, *W]``, ``out[i] = g_i^T im2col(x_i)``, in chunks of samples, by one of two paths:

* im2col + batched GEMM (ungrouped, not transposed, on CPU): each chunk's padded input is taken
  channels last, its windows (``as_strided``, ``[b, *S', *K, Cin]``) copied to
  ``[b, L, K Cin]``, and ``bmm`` with the output gradient ``[b, L, Cout]`` gives
  ``[b, Cout, K Cin]``, permuted into the weight's layout. Chunks hold about
  ``IM2COL_CHUNK_BYTES`` of windows and output gradient.
* folded (every other case): the convolution's own weight-gradient kernel
  (``aten.convolution_backward``, as autograd runs it) on one grouped convolution over the chunk
  folded into the channels (``x`` as ``[1, b Cin, *S]``, ``b * groups`` groups); on CPU chunks of
  about ``CHUNK_BYTES`` of input and output gradient, made contiguous chunk by chunk; elsewhere
  the whole batch at once (not measured there yet).

Measured on the benchmark CNN's convolutions (2 CPU threads, channels-last, B = 64, 21
interleaved rounds, medians), im2col ÷ folded (÷ the batched weight gradient non-private
training runs): 3 -> 32 channels at 32×32 0.78 (2.96); 32 -> 32 at 32×32 0.94 (0.97); 32 -> 64,
stride 2, 0.66 (0.93); 64 -> 64 at 16×16 1.06 (1.48); 1×1 shortcut 32 -> 64, stride 2, 0.28
(1.26); 64 -> 128, stride 2, 0.64 (1.44); 128 -> 128 at 8×8 0.58 (2.44). The grouped kernel
over a folded batch runs well below the batched kernel's speed on CPU (worst with few positions
and many channels); the GEMMs do not, and the window copy stays in cache chunk by chunk. The
chunked folded path had replaced folding the whole batch for the same reason (32 channels at
32×32: 13.9 vs 21.4 ms), and keeps the op's temporaries from growing with the batch (36 MB of the
benchmark CNN's tensor peak were one such op).

Opaque on purpose. The fold is a view of contiguous tensors only, and on CPU Inductor gives
convolutions channels-last tensors: written in the graph, the fold made Inductor also write each
output gradient in the contiguous layout (a strided scatter, fused into the normalization
backward before it) besides the channels-last one the input-gradient convolution reads. Here the
inputs keep Inductor's layout and each path copies what it needs chunk by chunk (measured on the
benchmark's CNN, 2 CPU threads: 5% less tensor peak than in the graph, the same step time).
Looping over the samples with one-sample convolutions instead was 8-10% slower there: they keep
two threads busy less well.
"""

from __future__ import annotations

import math

import torch

from .flops import register_flops

aten = torch.ops.aten

CHUNK_BYTES = 2 * 2**20  # folded: the input and output gradient of one chunk of samples
IM2COL_CHUNK_BYTES = 4 * 2**20  # im2col: the windows and output gradient of one chunk


def _samples_per_chunk(bytes_per_sample: int, budget: int) -> int:
    return max(1, budget // max(bytes_per_sample, 1))


def _use_im2col(x: torch.Tensor, transposed: bool, groups: int) -> bool:
    """The batched-GEMM path: measured faster on CPU only, for plain (ungrouped) convolutions."""
    return x.device.type == "cpu" and not transposed and groups == 1


def _im2col_weight_grads(x, g, out, weight_shape, stride, padding, dilation) -> None:
    """``out[i] = g_i^T im2col(x_i)`` by one batched GEMM per chunk of samples: the padded input
    as ``[b, *S, C]`` (channels last), its windows taken by ``as_strided`` as
    ``[b, *O, *K, C]`` and copied to ``[b, L, K C]``, the output gradient as ``[b, L, Cout]``;
    the GEMM's ``[b, Cout, *K, C]`` permuted into the weight's ``[b, Cout, C, *K]``."""
    n = x.dim() - 2
    kernel, out_size = weight_shape[2:], g.shape[2:]
    c, cout = x.shape[1], g.shape[1]
    positions, taps = math.prod(out_size), math.prod(kernel)
    chunk = _samples_per_chunk((positions * taps * c + positions * cout) * x.element_size(),
                               IM2COL_CHUNK_BYTES)
    last = (0, *range(2, 2 + n), 1)  # [b, C, *S] -> [b, *S, C]
    pads = [0, 0] + [side for p in reversed(padding) for side in (p, p)]
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk].permute(last)
        b = xs.shape[0]
        if any(padding):
            xs = torch.nn.functional.pad(xs, pads)
        sb, *spatial, sc = xs.stride()
        windows = xs.as_strided(
            (b, *out_size, *kernel, c),
            (sb, *[s * st for s, st in zip(spatial, stride)],
             *[s * d for s, d in zip(spatial, dilation)], sc))
        gs = g[start:start + b].permute(last).reshape(b, positions, cout)
        w = torch.bmm(gs.transpose(1, 2), windows.reshape(b, positions, taps * c))
        out[start:start + b].copy_(
            w.view(b, cout, *kernel, c).permute(0, 1, 2 + n, *range(2, 2 + n)))


def _folded_weight_grads(x, g, out, weight_shape, stride, padding, dilation, transposed,
                         output_padding, groups) -> None:
    """``out[i]``: the weight gradient of one grouped convolution over a chunk of samples
    folded into the channels (``B * groups`` groups)."""
    per_sample = x[:1].numel() * x.element_size() + g[:1].numel() * g.element_size()
    chunk = (_samples_per_chunk(per_sample, CHUNK_BYTES) if x.device.type == "cpu"
             else x.shape[0])
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


@torch.library.custom_op("fx_bk::conv_per_sample_weight_grad", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,))
def conv_per_sample_weight_grad(
    x: torch.Tensor, g: torch.Tensor, weight_shape: list[int], stride: list[int],
    padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
    groups: int,
) -> torch.Tensor:
    out = g.new_empty(x.shape[0], *weight_shape)
    if _use_im2col(x, transposed, groups):
        _im2col_weight_grads(x, g, out, weight_shape, stride, padding, dilation)
    else:
        _folded_weight_grads(x, g, out, weight_shape, stride, padding, dilation, transposed,
                             output_padding, groups)
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


register_flops(torch.ops.fx_bk.conv_per_sample_weight_grad, _flops)
