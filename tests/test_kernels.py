"""fx_bk::ghost_norm: the blocked symmetric formula, the custom op's fake implementation, and
the Triton kernel (run by Triton's interpreter on CPU, in a subprocess: TRITON_INTERPRET must be
set before triton is imported). fx_bk::embedding_weight_grad: rows summed per index, opaque to
Inductor. fx_bk::clipped_gemm: a Linear site's clipped weight gradient, any operand dtype."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fx_bk.kernels.embedding_grad import embedding_weight_grad
from fx_bk.kernels.ghost_norm import (
    ghost_cost,
    ghost_norm,
    ghost_norm_blocked,
    ghost_norm_reference,
)

SHAPES = [(2, 1, 5, 3), (3, 7, 4, 6), (2, 64, 8, 8), (2, 65, 9, 5), (1, 130, 16, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("block", [1, 16, 64])
def test_blocked_matches_full_gram(shape, block):
    b, t, d, p = shape
    g = torch.Generator().manual_seed(t)
    a = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    q = torch.randn(b, t, p, generator=g, dtype=torch.float64)
    want = ghost_norm_reference(a, q)
    torch.testing.assert_close(ghost_norm_blocked(a, q, block), want, rtol=1e-12, atol=0)
    # and it is the squared Frobenius norm of the per-sample gradient g_i^T a_i
    torch.testing.assert_close(want, torch.bmm(q.transpose(1, 2), a).pow(2).sum((1, 2)))


def test_default_block_follows_the_length():
    """Without a block the op takes ``ghost_block(T)`` (128 positions from 512 on): the same
    value as the blocked formula with that block, the reference norm, and its FLOPs counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from fx_bk.cost_model import ghost_block

    assert (ghost_block(511), ghost_block(512)) == (64, 128)
    g = torch.Generator().manual_seed(0)
    a, q = torch.randn(2, 600, 5, generator=g), torch.randn(2, 600, 3, generator=g)
    with FlopCounterMode(display=False) as counter:
        got = ghost_norm(a, q)
    assert torch.equal(got, ghost_norm_blocked(a, q, 128))
    assert not torch.equal(ghost_norm_blocked(a, q, 128), ghost_norm_blocked(a, q, 64))
    torch.testing.assert_close(got.double(), ghost_norm_reference(a.double(), q.double()),
                               rtol=1e-5, atol=0)
    assert counter.get_total_flops() == 2 * 2 * ghost_cost(600, 5, 3, 128)


def test_custom_op_registration():
    a, q = torch.randn(3, 10, 4), torch.randn(3, 10, 5)
    torch.library.opcheck(torch.ops.fx_bk.ghost_norm.default, (a, q, 4))
    assert ghost_norm(a, q).dtype == torch.float32
    compiled = torch.compile(lambda a, q: ghost_norm(a, q) * 2, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(a, q), 2 * ghost_norm_reference(a, q))


def test_cost_is_about_half_the_full_gram_for_long_sequences():
    full = 1024 * 1024 * (256 + 256)
    assert ghost_cost(1024, 256, 256, 64) / full == pytest.approx(0.5 + 64 / 2048, rel=1e-9)
    assert ghost_cost(10, 3, 4) == 10 * 10 * 7  # one block: the whole Gram
    # the default block: 64 positions below 512, 128 from there on
    assert ghost_cost(511, 3, 4) == ghost_cost(511, 3, 4, 64)
    assert ghost_cost(1024, 256, 256) / full == pytest.approx(0.5 + 128 / 2048, rel=1e-9)


TRITON_CHECK = textwrap.dedent("""
    import torch
    from fx_bk.kernels.ghost_norm import ghost_norm_reference
    from fx_bk.kernels.triton_ghost_norm import triton_ghost_norm
    worst = 0.0
    for b, t, d, p in [(2, 5, 7, 3), (3, 40, 33, 20), (1, 64, 16, 48), (2, 1, 8, 8)]:
        g = torch.Generator().manual_seed(t)
        a, q = torch.randn(b, t, d, generator=g), torch.randn(b, t, p, generator=g)
        want = ghost_norm_reference(a.double(), q.double())
        got = triton_ghost_norm(a, q).double()
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    print(worst)
""")


def test_triton_kernel_under_interpreter():
    import triton  # noqa: F401  (a test dependency: pyproject's [test] extra)

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-6


def test_embedding_weight_grad_sums_rows_per_index():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 6, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 7, (50,), generator=g)  # repeated indices; some rows never hit
    want = torch.zeros(9, 6, dtype=torch.float64).index_add(0, idx, rows)
    torch.testing.assert_close(embedding_weight_grad(rows, idx, 9), want, rtol=0, atol=1e-12)
    torch.library.opcheck(torch.ops.fx_bk.embedding_weight_grad.default, (rows, idx, 9))


def test_embedding_clipped_grad_is_one_opaque_call_in_the_compiled_backward():
    """Inductor would lower an index_add in the graph to its own (slow on CPU) scatter loop."""
    from torch._inductor.utils import run_and_get_code

    import fx_bk

    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Flatten(),
                                torch.nn.Linear(12, 2))
    bk = torch.compile(fx_bk.transform(model, max_grad_norm=1.0), fullgraph=True)
    x = torch.randint(0, 11, (5, 3))

    def step():
        bk(x).sum().backward()

    _, codes = run_and_get_code(step)
    backward = "\n".join(codes)
    assert "fx_bk.embedding_weight_grad" in backward
    assert "atomic_add" not in backward


CONV_GEOMETRIES = [  # (transposed, x shape, weight shape, stride, padding, dilation, groups)
    (False, (3, 4, 9, 8), (6, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1),
    (False, (3, 4, 9, 8), (6, 2, 3, 2), [2, 1], [0, 1], [1, 2], 2),
    (False, (2, 3, 7), (4, 3, 3), [2], [1], [1], 1),
    (True, (3, 4, 5, 5), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1], 1),
    (False, (3, 4, 9, 8), (5, 4, 3, 2), [1, 2], [2, 0], [2, 1], 1),
    (False, (3, 2, 5, 4, 6), (3, 2, 2, 3, 1), [1, 2, 1], [1, 0, 0], [2, 1, 1], 1),
    (False, (3, 3, 7, 6), (4, 3, 3, 2), [1, 1], [0, 1], [2, 1], 1),
    (False, (2, 2, 6, 5, 4), (3, 2, 3, 2, 3), [1, 1, 1], [1, 0, 2], [1, 2, 1], 1),
    (False, (3, 2, 9), (3, 2, 4), [1], [2], [2], 1),
]


def _per_sample_conv_case(geometry, seed: int = 0):
    """``(x, g, G)`` for a ``CONV_GEOMETRIES`` entry, float64: a random input and output
    gradient and every sample's weight gradient by autograd on that sample alone."""
    transposed, x_shape, w_shape, stride, padding, dilation, groups = geometry
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64)
    conv = {(False, 4): torch.nn.functional.conv2d, (False, 3): torch.nn.functional.conv1d,
            (False, 5): torch.nn.functional.conv3d,
            (True, 4): torch.nn.functional.conv_transpose2d}[transposed, x.dim()]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    g = torch.randn(conv(x, w, **kw).shape, generator=gen, dtype=torch.float64)
    expected = []
    for i in range(x.shape[0]):
        wi = w.clone().requires_grad_()
        (conv(x[i : i + 1], wi, **kw) * g[i : i + 1]).sum().backward()
        expected.append(wi.grad)
    return x, g, torch.stack(expected)


def _paths(geometry) -> list[str]:
    """The op's paths that can compute ``geometry``: folded always; im2col for ungrouped
    convolutions; shifted views also needs stride 1."""
    transposed, *_, stride, _, _, groups = geometry
    plain = not transposed and groups == 1
    return ["folded"] + (["im2col"] if plain else []) + (
        ["shifted"] if plain and all(s == 1 for s in stride) else [])


CONV_CASES = [(i, path) for i, geometry in enumerate(CONV_GEOMETRIES)
              for path in ["chosen", *_paths(geometry)]]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"{i}-{path}" for i, path in CONV_CASES])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk", [None, 2], ids=["one-chunk", "chunks-of-2"])
def test_conv_per_sample_weight_grad_is_each_samples_weight_grad(case, channels_last, chunk,
                                                                  monkeypatch):
    """Every sample's weight gradient, for contiguous and channels-last inputs (the layout
    Inductor gives convolutions on CPU), the whole batch in one chunk or in chunks of two samples
    (the last one shorter), by the path the op chooses and by each path that applies (shifted
    views, im2col + batched GEMM, the folded grouped convolution), equals the autograd weight
    gradient of that sample alone; the FLOP formula counts the per-sample multiply-adds; the
    result has the layout the fake tensor promises."""
    from torch.utils.flop_counter import FlopCounterMode

    from fx_bk.kernels import conv_grad
    from fx_bk.kernels.conv_grad import conv_per_sample_weight_grad

    index, path = case
    geometry = CONV_GEOMETRIES[index]
    transposed, x_shape, w_shape, stride, padding, dilation, groups = geometry
    x, g, expected = _per_sample_conv_case(geometry)
    if channels_last and x.dim() == 4:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    if chunk is not None:
        monkeypatch.setattr(conv_grad, "_samples_per_chunk", lambda *_: chunk)
    chosen = conv_grad._path(x, g, list(w_shape), stride, transposed, groups)
    assert chosen in _paths(geometry)
    if path != "chosen":
        monkeypatch.setattr(conv_grad, "_path", lambda *_: path)
    args = (list(w_shape), stride, padding, dilation, transposed, [0] * len(stride), groups)
    with FlopCounterMode(display=False) as counter:
        got = conv_per_sample_weight_grad(x, g, *args)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert got.stride() == conv_grad.out_storage(g, list(w_shape)).stride()
    positions = (x_shape if transposed else g.shape)[2:]
    per_sample = torch.Size(positions).numel() * torch.Size(w_shape).numel()
    assert counter.get_total_flops() == 2 * x_shape[0] * per_sample


def test_conv_per_sample_weight_grad_chooses_shifted_views_for_large_windows():
    """On CPU a stride-1 convolution with many channels and large windows takes the shifted
    views, a narrow or strided one im2col, a grouped or transposed one the folded path."""
    from fx_bk.kernels.conv_grad import _path

    def path(c, size, stride=1, groups=1, transposed=False):
        x = torch.empty(2, c, size, size)
        g = torch.empty(2, 8, size // stride, size // stride)
        return _path(x, g, [8, c // groups, 3, 3], [stride, stride], transposed, groups)

    assert path(32, 32) == "shifted"  # 1.2 MB of windows per sample
    assert path(3, 32) == "im2col"  # too few channels for the per-tap GEMMs
    assert path(64, 16) == "im2col"  # 0.6 MB of windows
    assert path(32, 32, stride=2) == "im2col"
    assert path(32, 32, groups=2) == "folded"
    assert path(32, 32, transposed=True) == "folded"


CLIPPED_GEMM_SHAPES = [(4, 3, 5, 7), (4, 3, 7, 5), (3, 1, 6, 6), (2, 9, 4, 1)]  # B, T, d, p


def _clipped_gemm_reference(a, g, c, transposed):
    """``sum_i c_i g_i^T a_i`` sample by sample, skipping the samples with ``c_i = 0``."""
    terms = [ci * (ai.t() @ gi if transposed else gi.t() @ ai)
             for ai, gi, ci in zip(a, g, c) if ci != 0]
    return torch.stack(terms).sum(0)


@pytest.mark.parametrize("shape", CLIPPED_GEMM_SHAPES, ids=[str(s) for s in CLIPPED_GEMM_SHAPES])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("skipped", ["none", "finite", "nonfinite"])
def test_clipped_gemm_is_the_clipped_sum(shape, transposed, skipped):
    """``fx_bk::clipped_gemm`` equals the sum of the clipped per-sample gradients whichever
    operand is the smaller one; a sample with ``c_i = 0`` adds exactly zero, also when its
    activation and output gradient hold NaN and Inf (both operands, so whichever is scaled);
    the FLOP formula counts the GEMM."""
    from torch.utils.flop_counter import FlopCounterMode

    from fx_bk.kernels.clipped_gemm import clipped_gemm

    b, t, d, p = shape
    gen = torch.Generator().manual_seed(b * t + d)
    a = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, p, generator=gen, dtype=torch.float64)
    c = torch.rand(b, generator=gen, dtype=torch.float64) + 0.1
    if skipped != "none":
        c[1] = 0.0
    if skipped == "nonfinite":
        a[1, 0, 0], g[1, -1, -1] = float("nan"), float("inf")
    with FlopCounterMode(display=False) as counter:
        got = clipped_gemm(a, g, c, transposed)
    want = _clipped_gemm_reference(a, g, c, transposed)
    assert got.shape == ((d, p) if transposed else (p, d))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert counter.get_total_flops() == 2 * b * t * d * p
    torch.library.opcheck(torch.ops.fx_bk.clipped_gemm.default, (a, g, c, transposed))


@pytest.mark.parametrize("smaller", ["a", "g"])
def test_clipped_gemm_in_bf16_scales_in_float32_and_rounds_once(smaller):
    """bf16 operands (autocast): the smaller operand is scaled by the float32 clip factors and
    rounded to bf16 once, and the GEMM runs on bf16 operands with a bf16 result, as AMP's
    weight-gradient GEMM does."""
    from fx_bk.kernels.clipped_gemm import clipped_gemm

    gen = torch.Generator().manual_seed(3)
    d, p = (4, 8) if smaller == "a" else (8, 4)
    a = torch.randn(3, 5, d, generator=gen).bfloat16()
    g = torch.randn(3, 5, p, generator=gen).bfloat16()
    c = torch.rand(3, generator=gen) + 0.1
    cv = c.reshape(-1, 1, 1)
    if smaller == "a":
        sa, sg = (a.float() * cv).bfloat16(), g
    else:
        sa, sg = a, (g.float() * cv).bfloat16()
    want = sg.reshape(-1, p).t() @ sa.reshape(-1, d)
    got = clipped_gemm(a, g, c, False)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


@pytest.mark.parametrize("index", range(len(CONV_GEOMETRIES)))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("skipped", ["none", "finite", "nonfinite"])
def test_clipped_conv_weight_grad_is_the_clipped_sum(index, channels_last, skipped):
    """``fx_bk::clipped_conv_weight_grad`` equals ``sum_i c_i G_i`` of the per-sample weight
    gradients, whichever operand it scales, for contiguous and channels-last inputs, and
    returns a contiguous weight; a sample with ``c_i = 0`` adds exactly zero, also when its
    input and output gradient hold NaN and Inf; the FLOP formula counts the weight gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    from fx_bk.kernels.clipped_conv import clipped_conv_weight_grad

    geometry = CONV_GEOMETRIES[index]
    transposed, x_shape, w_shape, stride, padding, dilation, groups = geometry
    x, g, per_sample = _per_sample_conv_case(geometry, seed=index)
    c = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(index),
                   dtype=torch.float64) + 0.1
    if skipped != "none":
        c[1] = 0.0
    if skipped == "nonfinite":
        x[1].view(-1)[0], g[1].view(-1)[-1] = float("nan"), float("inf")
    want = torch.einsum("b,b...->...", c, torch.where(
        c.reshape(-1, *[1] * len(w_shape)) != 0, per_sample, 0))
    if channels_last and x.dim() == 4:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    args = (list(w_shape), stride, padding, dilation, transposed, [0] * len(stride), groups)
    with FlopCounterMode(display=False) as counter:
        got = clipped_conv_weight_grad(x, g, c, *args)
    assert got.is_contiguous() and got.shape == torch.Size(w_shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    positions = (x_shape if transposed else g.shape)[2:]
    assert counter.get_total_flops() == 2 * x_shape[0] * math.prod(positions) * math.prod(w_shape)
    torch.library.opcheck(torch.ops.fx_bk.clipped_conv_weight_grad.default, (x, g, c, *args))
