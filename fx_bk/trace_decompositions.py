"""The decompositions the BK forward trace applies (``passes/trace_model.py``).

* fused recurrent ops as their cells (``recurrent.py``);
* attention with a trainable mask as its math (``attention.py``);
* ``im2col`` (``nn.Unfold``, ConvBERT's span convolution) by torch's own decomposition into
  padding and indexing: the kernel reads sizes as integers;
* a trainable table indexed by one integer tensor (``weight[position_ids]``: Whisper's learned
  positions; ``gate_up_proj[expert_ids]``: mixture-of-experts weights gathered per token) as
  the ``embedding`` it is, which has a ghost-norm rule;
* constant padding (``F.pad``, ``aten.constant_pad_nd``) as concatenations with filled blocks
  and narrowing: the composite kernels read the input's sizes as integers, which pins the
  symbolic batch when the joint graph re-traces them, and their Python reference writes into a
  buffer in place (Hugging Face Swin's window padding);
* a concatenation whose inputs but one are empty along its dim (a generation cache's first
  ``update``) as the contiguous copy eager ``cat`` returns (:func:`_cat_of_one`).
"""

from __future__ import annotations

import torch

from ._torch_internals import library_decompositions
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


def _index_as_embedding(input, indices):
    """``table[ids]`` on a trainable parameter (a leaf, not an activation) with one integer
    index tensor: ``embedding`` of its rows (flattened when the table has more dims, as the
    expert weights ``[E, out, in]`` a mixture-of-experts layer gathers per token)."""
    if (input.dim() < 2 or not (input.requires_grad and input.is_leaf) or len(indices) != 1
            or indices[0] is None or indices[0].dtype not in (torch.int64, torch.int32)):
        return NotImplemented
    ids = indices[0]
    if input.dim() == 2:
        return aten.embedding.default(input, ids)
    rows = aten.embedding.default(input.reshape(input.shape[0], -1), ids)
    return rows.reshape(*ids.shape, *input.shape[1:])


def _is_skipped(t: torch.Tensor, dim: int, rank: int) -> bool:
    """An input ``cat`` contributes nothing to: a static 0 along ``dim`` (or the legacy 1-D
    empty tensor ``cat`` skips), needing no gradient."""
    if t.requires_grad:
        return False
    if t.dim() == 1 and rank != 1:
        return type(t.shape[0]) is int and t.shape[0] == 0
    return t.dim() == rank and type(t.shape[dim]) is int and t.shape[dim] == 0


def _cat_of_one(tensors, dim=0):
    """``cat`` whose inputs but one are empty along ``dim`` (Hugging Face's ``DynamicCache``
    on its first ``update``: an empty ``[B, heads, 0, head_dim]`` and the new keys, which are a
    transposed view) as what eager ``cat`` returns: a contiguous copy in the promoted dtype.
    With a symbolic batch the fake ``cat`` gave other strides than eager, and than the fake
    ``cat`` of ``torch.compile``'s own trace of the BK program; attention's matmul, traced as
    a ``view`` of its output, then failed there ("Cannot view a tensor with shape ...")."""
    if not tensors:
        return NotImplemented
    rank = max(t.dim() for t in tensors)
    d = dim % rank if rank else 0
    kept = [t for t in tensors if not _is_skipped(t, d, rank)]
    if len(kept) != 1 or len(tensors) == 1 or kept[0].dim() != rank:
        return NotImplemented
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return kept[0].to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


TRACE_DECOMPOSITIONS = {
    **library_decompositions([aten.im2col]),
    **RECURRENT_DECOMPOSITIONS,
    **ATTENTION_DECOMPOSITIONS,
    aten.pad.default: _constant_pad,
    aten.constant_pad_nd.default: _pad_functional,
    aten.index.Tensor: _index_as_embedding,
    aten.cat.default: _cat_of_one,
}
