"""``fx_bk::conv_per_sample_weight_grad``: a convolution's weight gradient for every sample.

``x: [B, Cin, *S]`` (the convolution's input), ``g: [B, Cout, *S']`` (its output gradient) ->
``[B, *W]``, ``out[i] = g_i^T im2col(x_i)``, in chunks of samples, by one of three paths:

* shifted views (ungrouped, stride 1, on CPU, where the windows would be large: at least
  ``SHIFTED_MIN_CHANNELS`` input channels and ``SHIFTED_MIN_WINDOW_BYTES`` of windows per
  sample): one batched GEMM per kernel tap, of the output gradient (padded with zeros to the
  padded input's grid beyond the first spatial dim) against a view of the padded input shifted
  by the tap. With the grid's row length as the output's, every tap's rows are one strided
  matrix (row stride ``Cin``), so nothing is copied but the padding; the extra columns meet zero
  output gradient and read only the same sample's padded input. Chunks hold about
  ``SHIFTED_CHUNK_BYTES`` of padded input and output gradient.
* im2col + batched GEMM (ungrouped, not transposed, on CPU otherwise): each chunk's padded
  input is taken channels last, its windows (``as_strided``, ``[b, *S', *K, Cin]``) copied to
  ``[b, L, K Cin]``, and ``bmm`` with the output gradient ``[b, L, Cout]`` writes
  ``[b, Cout, K Cin]`` into the result's storage. Chunks hold about ``IM2COL_CHUNK_BYTES`` of
  windows and output gradient.
* folded (every other case): the convolution's own weight-gradient kernel
  (``aten.convolution_backward``, as autograd runs it) on one grouped convolution over the chunk
  folded into the channels (``x`` as ``[1, b Cin, *S]``, ``b * groups`` groups); on CPU chunks of
  about ``CHUNK_BYTES`` of input and output gradient, made contiguous chunk by chunk; elsewhere
  the whole batch at once (not measured there yet).

Measured on the benchmark CNN's convolutions (an AMD EPYC host, 2 CPU threads, channels-last,
B = 64, 21 interleaved rounds, medians), im2col ÷ folded (÷ the batched weight gradient non-private
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

The result's storage is ``[B, Cout, *K, Cin]`` (``out_storage``), the GEMMs' own layout: the
im2col GEMM writes into it, no permuting copy of ``B`` weight-sized gradients (on an Intel Xeon
with AVX-512, 2 threads, B = 64, that copy was 30-40% of the op's time at 64 -> 128 and
128 -> 128 channels). Padded inputs are zeroed once per call, each chunk copied into the
interior (``F.pad`` per chunk filled the whole chunk each time). Per path on that CPU, ms
(channels-last inputs, medians of 3 x 7 runs, two runs): 32 -> 32 channels at 32×32, shifted
5.7-6.0, im2col 8.6-9.6, the batched weight gradient non-private training runs 3.1-3.2;
64 -> 64 at 16×16, shifted 5.2-5.8, im2col 4.9-5.5 (im2col kept below 1 MiB of windows);
3 -> 32 at 32×32, shifted 3.2-3.6, im2col 1.7-1.8. In the benchmark CNN's compiled step (one
process, 14 interleaved rounds), im2col in place of the shifted views: 1.045x [1.038, 1.065]
the step time.
"""

from __future__ import annotations

import itertools
import math

import torch

from .flops import register_flops

aten = torch.ops.aten

CHUNK_BYTES = 2 * 2**20  # folded: the input and output gradient of one chunk of samples
IM2COL_CHUNK_BYTES = 4 * 2**20  # im2col: the windows and output gradient of one chunk
SHIFTED_CHUNK_BYTES = 2 * 2**20  # shifted: the padded input and output gradient of one chunk
SHIFTED_MIN_CHANNELS = 16  # fewer input channels: the per-tap GEMMs are too narrow
SHIFTED_MIN_WINDOW_BYTES = 2**20  # smaller windows per sample: im2col's copy stays cheap


def _samples_per_chunk(bytes_per_sample: int, budget: int) -> int:
    return max(1, budget // max(bytes_per_sample, 1))


def _path(x: torch.Tensor, g: torch.Tensor, weight_shape, stride, transposed: bool,
          groups: int) -> str:
    """``"shifted"``, ``"im2col"`` or ``"folded"``: the GEMM paths were measured faster on CPU
    only, for plain (ungrouped, not transposed) convolutions; shifted views where im2col's
    windows would be large and the per-tap GEMMs not too narrow."""
    if x.device.type != "cpu" or transposed or groups != 1:
        return "folded"
    c = x.shape[1]
    windows = math.prod(g.shape[2:]) * math.prod(weight_shape[2:]) * c * x.element_size()
    if (all(s == 1 for s in stride) and c >= SHIFTED_MIN_CHANNELS
            and windows >= SHIFTED_MIN_WINDOW_BYTES):
        return "shifted"
    return "im2col"


def _padded_chunks(x: torch.Tensor, padding, chunk: int, extra: int = 0):
    """``(start, xs)`` per chunk of samples: ``xs = [b, *P, C]``, the chunk channels last,
    zero-padded by ``padding`` on both sides of each spatial dim and by ``extra`` more at the end
    of the first, in one buffer zeroed once per call with each chunk copied into its interior
    (``F.pad`` per chunk filled the whole chunk each time); unpadded, the chunk's view."""
    n = x.dim() - 2
    last = (0, *range(2, 2 + n), 1)  # [b, C, *S] -> [b, *S, C]
    if not any(padding) and not extra:
        for start in range(0, x.shape[0], chunk):
            yield start, x[start:start + chunk].permute(last)
        return
    sizes = [s + 2 * p for s, p in zip(x.shape[2:], padding)]
    sizes[0] += extra
    buf = x.new_zeros(min(chunk, x.shape[0]), *sizes, x.shape[1])
    inner = (slice(None), *[slice(p, p + s) for p, s in zip(padding, x.shape[2:])])
    for start in range(0, x.shape[0], chunk):
        b = min(chunk, x.shape[0] - start)
        buf[:b][inner] = x[start:start + b].permute(last)
        yield start, buf[:b]


def _shifted_weight_grads(x, g, store, weight_shape, padding, dilation) -> None:
    """Stride 1: ``store[i, :, *k, :] = g_i^T shift_k(x_i)`` per kernel tap ``k``, one batched
    GEMM per tap and chunk. The padded input ``[b, P_1 + 1, P_2, ..., C]`` (one extra slab of
    zeros so the last tap's view stays inside the sample), the output gradient padded to
    ``[b, O_1, P_2, ..., Cout]``: rows ``O_1 P_2 ...``, and tap ``k``'s view starts
    ``sum_j k_j d_j P_{j+1} ...`` positions in. The padded buffers are zeroed once per call and
    each chunk is copied into their interiors (:func:`_padded_chunks`); the taps' GEMMs write
    into one buffer, copied into ``store`` once per chunk. The GEMMs' operand and result views
    of those reused buffers are built once per chunk size, not per chunk (the op's Python and
    views were about a tenth of its time on the benchmark CNN)."""
    n = x.dim() - 2
    c, cout, kernel, out_size = x.shape[1], g.shape[1], weight_shape[2:], g.shape[2:]
    grid = [s + 2 * p for s, p in zip(x.shape[2:], padding)]
    rows = out_size[0] * math.prod(grid[1:])
    step = [math.prod(grid[j + 1:]) for j in range(n)]  # positions per index of spatial dim j
    taps = list(itertools.product(*map(range, kernel)))
    shifts = [sum(k * d * s for k, d, s in zip(tap, dilation, step)) for tap in taps]
    last = (0, *range(2, 2 + n), 1)  # [b, C, *S] -> [b, *S, C]
    per_sample = ((grid[0] + 1) * math.prod(grid[1:]) * c + rows * cout) * x.element_size()
    chunk = min(x.shape[0], _samples_per_chunk(per_sample, SHIFTED_CHUNK_BYTES))
    gbuf = g.new_zeros(chunk, out_size[0], *grid[1:], cout)
    g_inner = tuple(slice(0, s) for s in out_size)
    products = g.new_empty(len(taps), chunk, cout, c)
    to_store = (n, n + 1, *range(n), n + 2)  # [*K, b, Cout, C] -> [b, Cout, *K, C]
    gemms = {}  # (b, the chunk's storage) -> (the g copy's interior, [(g^T, view, out)] per tap)
    for start, xs in _padded_chunks(x, padding, chunk, extra=1):
        b = xs.shape[0]
        key = (b, xs.data_ptr())
        if key not in gemms:
            gs = gbuf[:b]
            gt = gs.view(b, rows, cout).transpose(1, 2)  # [b, Cout, rows]
            gemms[key] = gs[(slice(None), *g_inner)], [
                (gt, xs.as_strided((b, rows, c), (xs.stride(0), c, 1), shift * c),
                 products[t, :b]) for t, shift in enumerate(shifts)]
        g_interior, taps_gemms = gemms[key]
        g_interior.copy_(g[start:start + b].permute(last))
        for gt, view, out in taps_gemms:
            torch.bmm(gt, view, out=out)
        store[start:start + b] = products[:, :b].view(*kernel, b, cout, c).permute(to_store)


def _im2col_weight_grads(x, g, out, weight_shape, stride, padding, dilation) -> None:
    """``out[i] = g_i^T im2col(x_i)`` by one batched GEMM per chunk of samples: the padded input
    as ``[b, *S, C]`` (channels last), its windows taken by ``as_strided`` as
    ``[b, *O, *K, C]`` and copied to ``[b, L, K C]``, the output gradient as ``[b, L, Cout]``;
    the GEMM writes its ``[b, Cout, *K, C]`` straight into ``out``'s storage
    (``out_storage``)."""
    n = x.dim() - 2
    kernel, out_size = weight_shape[2:], g.shape[2:]
    c, cout = x.shape[1], g.shape[1]
    positions, taps = math.prod(out_size), math.prod(kernel)
    chunk = _samples_per_chunk((positions * taps * c + positions * cout) * x.element_size(),
                               IM2COL_CHUNK_BYTES)
    last = (0, *range(2, 2 + n), 1)  # [b, C, *S] -> [b, *S, C]
    store = storage_view(out)
    for start, xs in _padded_chunks(x, padding, chunk):
        b = xs.shape[0]
        sb, *spatial, sc = xs.stride()
        windows = xs.as_strided(
            (b, *out_size, *kernel, c),
            (sb, *[s * st for s, st in zip(spatial, stride)],
             *[s * d for s, d in zip(spatial, dilation)], sc))
        gs = g[start:start + b].permute(last).reshape(b, positions, cout)
        torch.bmm(gs.transpose(1, 2), windows.reshape(b, positions, taps * c),
                  out=store[start:start + b].view(b, cout, taps * c))


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


def storage_view(out: torch.Tensor) -> torch.Tensor:
    """``out_storage``'s result as its storage's ``[B, Cout, *K, C]`` (contiguous): the order
    to reduce it in (a per-sample norm or a sum over the batch read in the weight's logical
    order strides across the storage and does not vectorize)."""
    n = out.dim() - 3
    return out.permute(0, 1, *range(3, 3 + n), 2)


def from_storage_order(w: torch.Tensor) -> torch.Tensor:
    """A weight-sized ``[Cout, *K, C]`` (the batch sum of :func:`storage_view`) as the
    weight's ``[Cout, C, *K]``."""
    return w.permute(0, w.dim() - 1, *range(1, w.dim() - 1))


def out_storage(g: torch.Tensor, weight_shape: list[int]) -> torch.Tensor:
    """The op's result ``[B, *W]`` (``W = [Cout, C, *K]``) over storage laid out as
    ``[B, Cout, *K, C]``: the im2col GEMM's own layout, so it writes its result in place. Its
    readers (the norms, the clipped sum over the batch) reduce over the sample's elements in any
    order."""
    n = len(weight_shape) - 2
    cout, c, kernel = weight_shape[0], weight_shape[1], weight_shape[2:]
    return g.new_empty(g.shape[0], cout, *kernel, c).permute(0, 1, 2 + n, *range(2, 2 + n))


@torch.library.custom_op("fx_bk::conv_per_sample_weight_grad", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,))
def conv_per_sample_weight_grad(
    x: torch.Tensor, g: torch.Tensor, weight_shape: list[int], stride: list[int],
    padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
    groups: int,
) -> torch.Tensor:
    out = out_storage(g, weight_shape)
    path = _path(x, g, weight_shape, stride, transposed, groups)
    if path == "shifted":
        _shifted_weight_grads(x, g, storage_view(out), weight_shape, padding, dilation)
    elif path == "im2col":
        _im2col_weight_grads(x, g, out, weight_shape, stride, padding, dilation)
    else:
        _folded_weight_grads(x, g, out, weight_shape, stride, padding, dilation, transposed,
                             output_padding, groups)
    return out


@conv_per_sample_weight_grad.register_fake
def _fake(x, g, weight_shape, stride, padding, dilation, transposed, output_padding, groups):
    torch._check(x.shape[0] == g.shape[0])
    return out_storage(g, weight_shape)


def weight_grad_flops(x_shape, g_shape, weight_shape, transposed: bool) -> int:
    """2 per multiply-add of a convolution's weight gradient, per sample or summed: every
    position of the strided side (the output of a convolution, the input of a transposed one)
    meets every weight element once per sample."""
    positions = math.prod((x_shape if transposed else g_shape)[2:])
    return 2 * x_shape[0] * positions * math.prod(weight_shape)


def _flops(x_shape, g_shape, weight_shape, stride, padding, dilation, transposed,
           output_padding, groups, **kwargs) -> int:
    return weight_grad_flops(x_shape, g_shape, weight_shape, transposed)


register_flops(torch.ops.fx_bk.conv_per_sample_weight_grad, _flops)
