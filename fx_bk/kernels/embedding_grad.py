"""``fx_bk::embedding_weight_grad``: an embedding table's gradient from row gradients.

``grad: [N, d]`` (one row per looked-up position, already scaled by the clip factors),
``indices: [N]`` -> ``[num_weights, d]``, rows summed per index: the op autograd runs for
``nn.Embedding`` (``aten.embedding_dense_backward``), called eagerly.

Opaque on purpose: Inductor lowers an ``index_add`` / ``embedding_dense_backward`` written in the
graph to its own scatter-add loop, which on CPU (torch 2.13, 2 threads) is ~10x slower than the
ATen kernel for small tables (B*T = 4096 rows of d = 256 into V = 512: 3.9 ms compiled vs 0.4 ms
eager). As a custom op with a fake implementation Inductor calls the ATen kernel as an extern.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fx_bk::embedding_weight_grad", mutates_args=())
def embedding_weight_grad(grad: torch.Tensor, indices: torch.Tensor,
                          num_weights: int) -> torch.Tensor:
    return torch.ops.aten.embedding_dense_backward(grad, indices, num_weights, -1, False)


@embedding_weight_grad.register_fake
def _embedding_weight_grad_fake(grad, indices, num_weights):
    torch._check(grad.shape[0] == indices.shape[0])
    return grad.new_empty(num_weights, grad.shape[-1])
