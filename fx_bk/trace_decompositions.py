"""The decompositions the BK forward trace applies (``passes/trace_model.py``).

* fused recurrent ops as their cells (``recurrent.py``);
* attention with a trainable mask as its math (``attention.py``);
* constant padding (``F.pad``, ``aten.constant_pad_nd``) as concatenations with filled blocks
  and narrowing: the composite kernels read the input's sizes as integers, which pins the
  symbolic batch when the joint graph re-traces them, and their Python reference writes into a
  buffer in place (Hugging Face Swin's window padding).
"""

from __future__ import annotations

import torch

from .attention import ATTENTION_DECOMPOSITIONS
from .recurrent import RECURRENT_DECOMPOSITIONS

aten = torch.ops.aten


def _pad_functional(input, pad, value=0.0):
    """``constant_pad_nd`` out of place: ``pad`` holds (left, right) per dim from the last;
    negative amounts crop."""
    out = input
    for k in range(len(pad) // 2):
        dim, left, right = input.dim() - 1 - k, pad[2 * k], pad[2 * k + 1]
        if left < 0:
            out = out.narrow(dim, -left, out.shape[dim] + left)
        if right < 0:
            out = out.narrow(dim, 0, out.shape[dim] + right)
        pieces = [out]
        for amount, at in ((left, 0), (right, 1)):
            if amount > 0:
                shape = list(out.shape)
                shape[dim] = amount
                pieces.insert(len(pieces) * at, out.new_full(shape, value))
        if len(pieces) > 1:
            out = torch.cat(pieces, dim)
    return out if out is not input else input.clone()


def _constant_pad(input, pad, mode="constant", value=None):
    if mode != "constant":
        return NotImplemented
    return _pad_functional(input, pad, 0.0 if value is None else value)


TRACE_DECOMPOSITIONS = {
    **RECURRENT_DECOMPOSITIONS,
    **ATTENTION_DECOMPOSITIONS,
    aten.pad.default: _constant_pad,
    aten.constant_pad_nd.default: _pad_functional,
}
