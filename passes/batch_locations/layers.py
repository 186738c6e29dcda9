"""Layers with their own batch convention: convolutions and norms, attention, embeddings."""

from __future__ import annotations

from dataclasses import replace

import torch

from .lattice import SHARED, Sample, Shared, mixed


def batch_first(*tensor_args: str):
    """Ops whose first input carries the batch in dim 0 (convolutions, group and instance norm,
    prelu); the other tensor arguments (weights, statistics) apply to every sample alike, so
    they must be shared and not depend on the batch size."""

    def rule(node, args, loc, ctx):  # (transfer already returned a mixed input's origin)
        for name in tensor_args[1:]:  # weights, biases, running statistics
            lo = loc(args.get(name)) if isinstance(args.get(name), torch.fx.Node) else SHARED
            if isinstance(lo, Sample) or lo.batchy:  # one filter or scale for every sample
                return mixed(node, f"takes '{name}' computed from samples' values or the batch "
                                   f"size: every sample would use it")
        lx = loc(args.get(tensor_args[0]))
        if isinstance(lx, Sample) and lx.dim != 0:
            return mixed(node, "its batch dim must be dim 0")
        return lx

    return rule


def leading_batch(node, args, loc, ctx):
    """Attention and layer/RMS norms: every per-sample operand carries the batch in one leading
    dim (aligned from the right), untouched by the op (not among its last ``inner`` dims)."""
    attention = "query" in args
    names = ("query", "key", "value", "attn_mask") if attention else ("input", "weight", "bias")
    inner = 2 if attention else len(args["normalized_shape"])
    offset = found = None
    iota = True
    for name in names:
        o = args.get(name)
        lo = loc(o) if isinstance(o, torch.fx.Node) else SHARED
        if isinstance(lo, Shared):
            if lo.batchy:
                return mixed(node, f"its '{name}' depends on the batch size or positions")
            continue
        if not isinstance(lo, Sample):
            return lo
        off = lo.dim - len(ctx.shape(o))
        if off >= -inner:
            return mixed(node, f"attends or normalizes across the batch dimension (of '{name}')")
        if offset is not None and (off != offset or found.layout != lo.layout):
            return mixed(node, "attends or normalizes across different samples")
        offset, found, iota = off, lo, iota and lo.iota
    if offset is None:
        return SHARED
    return replace(found, dim=len(ctx.shape(node)) + offset, iota=iota)


def batch_norm(node, args, loc, ctx):
    training = args.get("training", False)
    if training and isinstance(loc(args["input"]), Sample):
        return mixed(node, "normalizes with batch statistics (BatchNorm in training mode): use "
                           "GroupNorm or LayerNorm, or put the module in eval mode")
    return batch_first("input", "weight", "bias")(node, args, loc, ctx)


def embedding(node, args, loc, ctx):
    lw, li = loc(args["weight"]), loc(args["indices"])
    if isinstance(lw, Sample):
        return mixed(node, "looks up per-sample tables")
    return li if not isinstance(li, Sample) or not li.iota else Shared(True)
