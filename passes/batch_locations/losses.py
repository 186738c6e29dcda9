"""Loss ops, and arithmetic on a loss over the batch."""

from __future__ import annotations

import torch

from fx_bk._torch_internals import sym_expr

from .lattice import SHARED, Loss, Sample, Shared, arg_nodes, arg_values, first_tensor, mixed

aten = torch.ops.aten


def loss_op(node, args, loc, ctx):
    """``cross_entropy``/``nll_loss``/``mse_loss``...: reduction none keeps the batch; sum is a
    sum of per-sample terms; mean over equally many terms per sample is their mean, and with an
    ``ignore_index`` it is a mean over labelled terms."""
    x = first_tensor(args)
    target = args.get("target")
    lx, lt = loc(x), loc(target) if isinstance(target, torch.fx.Node) else SHARED
    if isinstance(loc(args.get("weight")) if isinstance(args.get("weight"), torch.fx.Node)
                  else SHARED, Sample):
        return mixed(node, "weights the loss with per-sample weights")
    sample = lx if isinstance(lx, Sample) else lt
    if not isinstance(sample, Sample):
        return SHARED
    if isinstance(lx, Sample) and isinstance(lt, Sample) and (lx.dim, lx.layout) != (
            lt.dim, lt.layout):  # [B*T] logits with [T*B] targets pair different samples
        return mixed(node, "pairs inputs and targets of different samples")
    if sample.dim != 0:
        return mixed(node, "its batch dim must be dim 0")
    reduction = args.get("reduction", 1)
    if reduction == 0:
        return sample
    if reduction == 2:
        return Loss("sum")
    labelled = node.target.overloadpacket in (aten.cross_entropy_loss, aten.nll_loss,
                                              aten.nll_loss_nd, aten.nll_loss2d)
    if labelled and isinstance(args.get("weight"), torch.fx.Node):
        return mixed(node, "is a class-weighted mean: its divisor, the batch's total weight, "
                           "couples the samples (use reduction='none' and average per sample)")
    return Loss("mean", (node,) if labelled else ())


def on_loss(node, args, loc, ctx):
    """Arithmetic on a loss: scaling by a constant keeps it a mean/sum of per-sample terms
    (divided by the batch size a sum becomes a mean); two losses of one kind add up."""
    nodes = arg_nodes(args)
    locs = [loc(a) for a in nodes]
    n_losses = sum(isinstance(v, Loss) for v in locs)
    losses = {v.reduction for v in locs if isinstance(v, Loss)}
    guards = tuple(g for v in locs if isinstance(v, Loss) for g in v.guards)
    others = [v for v in locs if not isinstance(v, Loss)]
    scalars = [ctx.value(v) for v in arg_values(args)
               if not isinstance(ctx.value(v), torch.Tensor)]
    packet = node.target.overloadpacket
    if any(not isinstance(v, Shared) or v.batchy for v in others) or len(losses) > 1:
        return mixed(node, "combines the loss with per-sample or batch-size-dependent values")
    kind = losses.pop()
    if packet in (aten.add, aten.sub) and not others and not any(
            isinstance(v, torch.SymInt) for v in scalars):
        return Loss(kind, guards)
    if n_losses > 1:
        return mixed(node, "multiplies or divides two batch reductions (e.g. a sum of losses "
                           "by a count over the batch): not a mean or sum of per-sample terms")
    if packet in (aten.mul, aten.div, aten.neg, aten.to, aten._to_copy, aten.clone,
                  aten.detach, aten.alias, aten.view, aten.reshape, aten.squeeze, aten.unsqueeze,
                  aten.expand, aten.contiguous, aten.type_as):
        sym = [v for v in scalars if isinstance(v, torch.SymInt)]
        if not sym:
            return Loss(kind, guards)
        if (packet is aten.div and kind == "sum" and len(sym) == 1
                and sym_expr(sym[0]) == ctx.symbol):
            return Loss("mean", guards)
        if packet is aten.mul and kind == "mean" and len(sym) == 1 \
                and sym_expr(sym[0]) == ctx.symbol:
            return Loss("sum", guards)
    return mixed(node, "uses the loss in a way fx_bk cannot prove is a mean or sum of "
                       "per-sample terms")
