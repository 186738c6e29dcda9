"""The joint trace's decompositions of backward ops (``fx_bk/backward_decompositions.py``):
equal to ATen's kernels, applied only to programs built for Inductor, and the reason they
exist (Inductor stores a group norm's input gradient once, in the convolution's layout)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.backward_decompositions import group_norm_backward
from fx_bk.testing import max_rel_err, vmap_clipped_sum

aten = torch.ops.aten

GROUP_NORM_CASES = [  # input shape, groups, affine
    ((3, 6), 3, True),
    ((3, 6, 5), 2, True),
    ((2, 8, 4, 3), 4, False),
    ((2, 4, 3, 2, 2), 1, True),
    ((4, 6, 7, 5), 6, True),
]


@pytest.mark.parametrize("case", GROUP_NORM_CASES, ids=range(len(GROUP_NORM_CASES)))
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]],
                         ids=["all", "input", "params"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_group_norm_backward_equals_atens(case, mask, dtype):
    """Every requested gradient (input, weight, bias) equals ATen's
    ``native_group_norm_backward`` on the same saved statistics: to rounding in float64; in
    bf16 (computed in float32 and cast back, as PyTorch's decomposition does) to bf16's
    precision."""
    shape, groups, affine = case
    if not affine:  # no weight and bias: ATen's kernel computes the input gradient only
        mask = [mask[0], False, False]
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    gamma = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype) if affine else None
    n, c = shape[0], shape[1]
    hw = x[0, 0].numel()
    _, mean, rstd = aten.native_group_norm(x, gamma, None, n, c, hw, groups, 1e-5)
    want = aten.native_group_norm_backward(g, x, mean, rstd, gamma, n, c, hw, groups, mask)
    got = group_norm_backward(g, x, mean, rstd, gamma, n, c, hw, groups, mask)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for w, r, wanted in zip(got, want, mask):
        if not wanted:
            assert w is None
            continue
        assert w.dtype == r.dtype and w.shape == r.shape
        torch.testing.assert_close(w, r, **tol)


def _gn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double()


def _has_group_norm_backward(compiled) -> bool:
    return any(n.target == aten.native_group_norm_backward.default
               for n in compiled.prog.bw_graph.graph.nodes)


def test_only_programs_built_for_inductor_decompose_the_group_norm_backward():
    """The program built by an eager call keeps ATen's ``native_group_norm_backward`` (one fused
    kernel); the one built while torch.compile traces the call holds the decomposition; one
    module called both ways has both programs, each with the exact clipped sum."""
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    model = _gn_cnn()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    ref = vmap_clipped_sum(model, x, y, 0.1)
    for run in (bk, torch.compile(bk, fullgraph=True)):
        model.zero_grad()
        F.cross_entropy(run(x), y).backward()
        got = {n: p.grad for n, p in model.named_parameters()}
        assert max_rel_err(got, ref) < 1e-10
    eager, compiled = bk.programs
    assert not eager.prog.for_inductor and _has_group_norm_backward(eager)
    assert compiled.prog.for_inductor and not _has_group_norm_backward(compiled)


@pytest.fixture(scope="module")
def gn_cnn_backward_code() -> str:
    """The generated code of the float32 group norm CNN's compiled backward on CPU (B = 4,
    16x16 images)."""
    from torch._inductor.utils import run_and_get_code

    model = _gn_cnn().float()
    bk = torch.compile(fx_bk.transform(model, max_grad_norm=1.0), fullgraph=True)
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 5, (4,))

    def step():
        F.cross_entropy(bk(x), y).backward()

    _, codes = run_and_get_code(step)
    return codes[-1]


def test_compiled_group_norm_input_gradient_is_stored_once(gn_cnn_backward_code):
    """Compiled on CPU (convolutions channels last), the input gradient of a group norm that
    feeds a convolution whose per-sample weight gradients are instantiated is stored once: no
    buffer in the grouped view's layout ``[B, groups, C / groups, H * W]`` besides the
    channels-last one the convolution's backward reads."""
    backward = gn_cnn_backward_code
    assert "conv_per_sample_weight_grad" in backward
    grouped_view = re.compile(r"empty_strided_cpu\(\(4, 2, 4, 256\)")
    assert not grouped_view.search(backward)


def _full_tensor_stores(code: str, batch_stride: int) -> tuple[int, int]:
    """(scalar, vector) stores of the generated C++ kernels whose index runs over whole
    ``[N, C, H, W]`` tensors (those with the batch stride ``batch_stride``)."""
    scalar = re.findall(rf"\w+\[static_cast<int64_t>\([^\]]*\b{batch_stride}L\*x0\)\] = ", code)
    vector = re.findall(rf"\.store\(\w+ \+ static_cast<int64_t>\([^)]*\b{batch_stride}L\*x0",
                        code)
    return len(scalar), len(vector)


def test_compiled_group_norm_input_gradient_loop_is_vectorized(gn_cnn_backward_code):
    """Compiled on CPU, every loop of the backward that writes a whole activation-sized tensor
    is vectorized. The group norm's input gradient reads its three per-channel factors
    contiguously along the channels (expanded from groups by one matrix product); read at
    ``channel // (C / groups)``, they were 4 of the loop's ~25 loads, over Inductor's CPU
    threshold for non-contiguous loads (12%), and the loop ran scalar (fails that way, checked)."""
    scalar, vector = _full_tensor_stores(gn_cnn_backward_code, 8 * 16 * 16)
    assert vector > 0
    assert scalar == 0
