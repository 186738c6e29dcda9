"""Ops the BK forward trace rewrites (``fx_bk/trace_decompositions.py``): constant padding out
of place, attention with a trainable mask as its math. Each equals the op, and a model using it
gets exact clipped gradients (the rewrite must keep autograd's gradient, not only the value)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fx_bk.attention import _sdpa_with_trainable_mask
from fx_bk.testing import assert_matches_per_sample
from fx_bk.trace_decompositions import _cat_of_one, _pad_functional

PADS = [(0, 0), (1, 2), (0, 0, 0, 1), (2, 0, -1, 1), (-1, -2, 1, 0, 0, 3)]


@pytest.mark.parametrize("pad", PADS, ids=str)
def test_functional_pad_equals_f_pad(pad):
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    ref = F.pad(x, pad, value=0.5)
    got = _pad_functional(x, pad, 0.5)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0],
                               torch.autograd.grad(ref, x, g)[0])


CAT_CASES = [  # (dim, dtypes of the empty inputs, legacy 1-D empties); x: float32
    (-2, (torch.float32,), False),  # a generation cache's first update
    (1, (torch.float64,), True),  # the legacy 1-D empty tensor; the dtype promoted
    (1, (torch.float32, torch.float32), False),
]


@pytest.mark.parametrize("case", CAT_CASES, ids=range(len(CAT_CASES)))
def test_cat_of_one_nonempty_input_equals_cat(case):
    """Values, dtype and strides (contiguous) as eager ``cat`` of empty inputs and one
    transposed view; the gradient flows to that one input."""
    dim, dtypes, legacy = case
    x = torch.randn(2, 4, 3, 5).transpose(1, 3).requires_grad_()
    empty_shape = [0] if legacy else [0 if k == dim % x.dim() else n
                                      for k, n in enumerate(x.shape)]
    tensors = [torch.empty(empty_shape, dtype=dtype) for dtype in dtypes] + [x]
    ref = torch.cat(tensors, dim)
    got = _cat_of_one(tensors, dim)
    assert got.dtype == ref.dtype and got.stride() == ref.stride()
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0],
                               torch.autograd.grad(ref, x, g)[0])


def test_cat_of_several_nonempty_inputs_is_left_to_torch():
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    assert _cat_of_one([x, y], 0) is NotImplemented
    assert _cat_of_one([torch.empty(0, 3, requires_grad=True), x], 0) is NotImplemented


def test_sdpa_math_equals_fused_op_with_a_float_mask():
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_sdpa_with_trainable_mask(q, k, v, mask, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, mask, scale=0.3))
    assert _sdpa_with_trainable_mask(q, k, v, mask.detach()) is NotImplemented


class PadBetweenLayers(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad
        self.a, self.ln, self.b = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 4]
        h = F.pad(self.ln(self.a(x)), self.pad)
        return self.b(h[:, :x.shape[1], :4]).sum(1)


class BiasTableAttention(nn.Module):
    """A relative bias table gathered by constant indices, as SDPA's additive mask."""

    def __init__(self, t=4, heads=2):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.table = nn.Parameter(torch.randn(2 * t - 1, heads) * 0.3)
        i = torch.arange(t)
        self.register_buffer("index", (i[None] - i[:, None] + t - 1).view(-1))
        self.t, self.heads, self.out = t, heads, nn.Linear(8, 2)

    def forward(self, x):  # [B, T, 8]
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, self.t, 3, self.heads, 4).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(self.t, self.t, self.heads).permute(2, 0, 1)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(h.transpose(1, 2).reshape(b, self.t, 8)).sum(1)


class IndexedPositions(nn.Module):
    """Whisper's learned positions: ``weight[position_ids]`` with ids repeated over the batch."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 4]
        ids = torch.arange(x.shape[1]).unsqueeze(0).repeat(x.shape[0], 1)
        return self.out(x + self.pos.weight[ids]).sum(1)


class GatheredExperts(nn.Module):
    """Top-1 routing to experts whose weights each token gathers (transformers' batched_mm
    experts): ``W[expert_ids]`` then a batched matmul."""

    def __init__(self, experts=3, d=4):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.w = nn.Parameter(torch.randn(experts, d, d) * 0.5)
        self.out = nn.Linear(d, 2)

    def forward(self, x):  # [B, T, d]
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        logits = self.router(tokens)
        ids = logits.argmax(-1)
        gate = logits.softmax(-1).gather(1, ids[:, None])
        h = torch.bmm(self.w[ids], tokens.unsqueeze(-1)).squeeze(-1) * gate
        return self.out(h.view(b, t, d)).sum(1)


def test_gathering_a_3d_table_equals_indexing():
    from fx_bk.trace_decompositions import _index_as_embedding

    w = torch.randn(5, 3, 2, requires_grad=True)
    ids = torch.tensor([[4, 0], [0, 2]])
    torch.testing.assert_close(_index_as_embedding(w, [ids]), w[ids])


class UnfoldedSpans(nn.Module):
    """``nn.Unfold`` of a projection (ConvBERT's span-based convolution), then a Linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.unfold = nn.Unfold((3, 1), padding=(1, 0))
        self.out = nn.Linear(12, 2)

    def forward(self, x):  # [B, T, 4]
        b, t, _ = x.shape
        spans = self.unfold(self.proj(x).transpose(1, 2).unsqueeze(-1))  # [B, 12, T]
        return self.out(spans.transpose(1, 2)).sum(1)


@pytest.mark.parametrize("model, shape", [
    (UnfoldedSpans(), (3, 5, 4)),
    (IndexedPositions(), (3, 5, 4)),
    (GatheredExperts(), (4, 5, 4)),
    (PadBetweenLayers((0, 0, 0, 1)), (3, 5, 4)),
    (PadBetweenLayers((1, 1, 2, 0)), (3, 5, 4)),
    (BiasTableAttention(), (3, 4, 8)),
], ids=["unfold", "indexed-table", "gathered-experts", "pad-rows", "pad-both-dims",
        "sdpa-bias-table"])
@pytest.mark.parametrize("max_grad_norm", [1e9, 0.05], ids=["unclipped", "clipped"])
def test_rewritten_ops_give_exact_clipped_gradients(model, shape, max_grad_norm):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    assert_matches_per_sample(model.double(), lambda out, _: out.pow(2).sum(), (x, None),
                              max_grad_norm=max_grad_norm, loss_reduction="sum", tol=1e-12)
