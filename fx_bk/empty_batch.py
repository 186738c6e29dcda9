"""The autograd function of an empty batch (Poisson sampling yields them)."""

from __future__ import annotations

import torch

from .step_guard import record_norms, step_token


class EmptyBatch(torch.autograd.Function):
    """Outputs of an empty batch, wired so that every trainable parameter gets a zero grad."""

    @staticmethod
    def forward(ctx, key, num_groups, n_params, *tensors):
        token = step_token(tensors[0], key) if n_params else None
        ctx.save_for_backward(*tensors[:n_params], token)
        ctx.key, ctx.num_groups = key, num_groups
        return tuple(t.clone() for t in tensors[n_params:])

    @staticmethod
    def backward(ctx, *grads):
        *params, token = ctx.saved_tensors
        zeros = [torch.zeros_like(p) for p in params]
        if zeros:
            empty = params[0].new_zeros((0, ctx.num_groups), dtype=torch.float32)
            zeros[0] = zeros[0] + record_norms(empty, ctx.key, token, False).to(zeros[0].dtype)
        return (None, None, None, *zeros, *[None] * len(grads))
