"""``scaled_dot_product_attention`` with a trainable mask, as its math, for the BK trace.

A relative-position bias (Swin, BEiT: a table gathered by constant indices) often enters
attention as SDPA's additive ``attn_mask``. The fused op hides the one place the bias meets the
batch; written out — ``softmax(q k^T * scale + mask) v`` — the mask is an ordinary broadcast
add, whose per-sample gradient the rules compute exactly (the table's then comes by the vjp of
the gather, ``fx_bk/rules/derived.py``). Only calls whose mask requires grad are rewritten;
every other SDPA call stays fused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _sdpa_with_trainable_mask(query, key, value, attn_mask=None, dropout_p=0.0,
                              is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is None or not attn_mask.requires_grad or is_causal:
        return NotImplemented  # the fused op
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=True)
    return torch.matmul(weights, value)


ATTENTION_DECOMPOSITIONS = {
    aten.scaled_dot_product_attention.default: _sdpa_with_trainable_mask,
}
