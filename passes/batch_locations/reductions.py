"""Ops that reduce a dim, or work along one (softmax, cumsum, sort, flip)."""

from __future__ import annotations

import torch

from .lattice import Loss, Sample, Shared, first_tensor, mixed, norm_dims

aten = torch.ops.aten


def reduction(dim_arg: str | None = "dim", keep: str | None = "keepdim"):
    """Reduces ``dim_arg`` (all dims when absent): over the batch it mixes samples -- unless it
    reduces everything, which the loss rules may accept."""

    def rule(node, args, loc, ctx):
        x = first_tensor(args)
        lx = loc(x)
        if not isinstance(lx, Sample):
            return lx
        ndim = len(ctx.shape(x))
        dims = norm_dims(args.get(dim_arg) if dim_arg else None, ndim)
        if lx.dim in dims:
            if len(dims) == ndim and node.target in (aten.sum.default, aten.sum.dim_IntList,
                                                     aten.mean.default, aten.mean.dim):
                name = "sum" if node.target in (aten.sum.default, aten.sum.dim_IntList) else "mean"
                return Loss(name) if not lx.iota else Shared(True)
            return mixed(node, "reduces over the batch dimension")
        kept = keep is not None and bool(args.get(keep, False))
        shift = 0 if kept else sum(1 for d in dims if d < lx.dim)
        return lx.at(lx.dim - shift)

    return rule


def along(dim_arg: str = "dim", default: int | None = None, multi: bool = False):
    """Works along one dim (softmax, cumsum, sort, flip, roll, cat ...): along the batch it mixes
    samples; otherwise the batch dim is unchanged."""

    def rule(node, args, loc, ctx):
        x = first_tensor(args)
        lx = loc(x)
        if not isinstance(lx, Sample):
            return [lx, lx] if multi else lx
        d = args.get(dim_arg, default)
        ndim = len(ctx.shape(x))
        if d is None or lx.dim in norm_dims(d, ndim):
            return mixed(node, "works along the batch dimension")
        return [lx, lx] if multi else lx

    return rule
