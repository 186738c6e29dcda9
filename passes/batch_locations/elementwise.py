"""Elementwise ops, and tensors made from sizes and scalars."""

from __future__ import annotations

from dataclasses import replace

import torch

from fx_bk._torch_internals import sym_expr

from .lattice import Sample, Shared, arg_nodes, arg_values, mixed


def pointwise(node, args, loc, ctx):
    """Broadcasting elementwise op: every sample input's batch must land on one output dim."""
    out = ctx.shape(node)
    ndim = len(out) if out is not None else 0
    found: Sample | None = None
    iota_only = True
    any_iota = batchy = False
    for a in arg_nodes(args):
        la = loc(a)
        if isinstance(la, Shared):
            batchy = batchy or la.batchy
            continue
        shape = ctx.shape(a)
        at = la.at(la.dim + ndim - len(shape))
        if found is not None and (found.dim, found.layout) != (at.dim, at.layout):
            return mixed(node, "pairs values of different samples (their batch dims do not line "
                               "up under broadcasting)")
        found = at if found is None or found.iota else found
        iota_only = iota_only and la.iota
        any_iota = any_iota or la.iota
    batchy = batchy or any(ctx.batch_valued(a) for a in arg_values(args))
    if found is None:
        return Shared(batchy)
    if iota_only:
        return found
    if batchy or any_iota:
        return mixed(node, "combines samples' values with a value that depends on the batch "
                           "size or on a sample's position in the batch")
    return replace(found, iota=False)


def creation(node, args, loc, ctx):
    """Tensors made from sizes and scalars: shared; batchy when a value (not a size) is the batch
    size, uniform along a batch-sized dim otherwise."""
    values = {k: v for k, v in args.items() if k not in (
        "self", "size", "dtype", "layout", "device", "pin_memory", "memory_format")}
    batchy = any(ctx.batch_valued(v) or (isinstance(v, torch.fx.Node) and not isinstance(
        ctx.value(v), torch.Tensor) and getattr(loc(v), "batchy", False))
        for v in arg_values(values))
    return Shared(batchy)


def arange(node, args, loc, ctx):
    start, step = args.get("start", 0), args.get("step", 1)
    end = ctx.value(args.get("end"))
    if (isinstance(end, torch.SymInt) and sym_expr(end) == ctx.symbol
            and ctx.value(start) == 0 and ctx.value(step) == 1):
        return Sample(0, 1, iota=True)
    return creation(node, args, loc, ctx)
