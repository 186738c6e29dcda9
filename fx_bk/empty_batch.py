"""The autograd function of an empty batch (Poisson sampling yields them), and the outputs
of the model on one."""

from __future__ import annotations

import torch

from .layout import flatten, unflatten
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


def empty_outputs(module: torch.nn.Module, args, kwargs):
    """The outputs of ``module`` on a batch of none: its forward on the empty batch, or, where
    that forward cannot run on zero rows (Hugging Face attention reshapes ``[0, T, -1, h]``),
    its forward on one row of zeros with every output cut to zero rows."""
    try:
        return module(*args, **kwargs)
    except RuntimeError:
        leaves: list = []
        layout = flatten((args, kwargs), leaves)
        one = [x.new_zeros((1, *x.shape[1:])) if isinstance(x, torch.Tensor) and x.dim() > 0
               and x.shape[0] == 0 else x for x in leaves]
        (args, kwargs), _ = unflatten(layout, one)
        out = module(*args, **kwargs)
    outs: list = []
    out_layout = flatten(out, outs, outputs=True)
    cut = [x[:0] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
           for x in outs]
    return unflatten(out_layout, cut)[0]
