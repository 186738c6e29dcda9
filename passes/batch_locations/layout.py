"""Ops that move, select or join values without computing: views, slices, indexing, cat."""

from __future__ import annotations

from dataclasses import replace

import sympy
import torch

from fx_bk._torch_internals import sym_expr

from .lattice import PROBE, Sample, Shared, first_tensor, mixed, norm_dim

aten = torch.ops.aten


def cat(node, args, loc, ctx):
    tensors = args["tensors"]
    d = args.get("dim", 0)
    locs = [loc(t) for t in tensors]
    samples = [(t, lt) for t, lt in zip(tensors, locs) if isinstance(lt, Sample)]
    if not samples:
        return Shared(any(lt.batchy for lt in locs))
    ndim = len(ctx.shape(samples[0][0]))
    if node.target is aten.stack.default:
        at = norm_dim(d, ndim + 1)
        dims = {lt.dim + (lt.dim >= at) for _, lt in samples}
    else:
        if norm_dim(d, ndim) in {lt.dim for _, lt in samples}:
            return mixed(node, "concatenates along the batch dimension")
        dims = {lt.dim for _, lt in samples}
    layouts = {lt.layout for _, lt in samples}
    if len(dims) > 1 or len(layouts) > 1 or any(lt.batchy for lt in locs
                                                 if isinstance(lt, Shared)):
        return mixed(node, "joins tensors whose batch dims do not line up")
    return replace(samples[0][1], dim=dims.pop(), iota=all(lt.iota for _, lt in samples))


def reshape(node, args, loc, ctx):
    """View/reshape. In the flat order the batch sits between ``outer`` blocks before it and
    ``inner`` elements per sample after it; the output keeps samples apart if one output dim
    holds the batch with the same blocks before and elements after it."""
    x = first_tensor(args)
    lx = loc(x)
    if not isinstance(lx, Sample):
        return lx
    shape_in, shape_out = ctx.shape(x), ctx.shape(node)
    outer = sympy.Mul(*shape_in[: lx.dim]) * lx.outer
    inner = lx.fold * sympy.Mul(*shape_in[lx.dim + 1:])
    for j, size in enumerate(shape_out):
        outer_j = sympy.simplify(outer / sympy.Mul(*shape_out[:j]))
        if ctx.has_batch(outer_j) or not outer_j.is_integer:
            continue
        fold = ctx.fold_of(size / outer_j)
        if fold is not None and fold.is_integer and \
                sympy.simplify(fold * sympy.Mul(*shape_out[j + 1:]) - inner) == 0:
            return replace(lx, dim=j, fold=fold, outer=outer_j)
    return mixed(node, "reshapes the batch dimension into or across other dims")


def permute(node, args, loc, ctx):
    lx = loc(first_tensor(args))
    if not isinstance(lx, Sample):
        return lx
    ndim = len(ctx.shape(first_tensor(args)))
    if node.target is aten.permute.default:
        order = [norm_dim(d, ndim) for d in args["dims"]]
    elif node.target is aten.t.default:
        order = list(range(ndim))[::-1]
    else:
        a, b = norm_dim(args["dim0"], ndim), norm_dim(args["dim1"], ndim)
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
    return lx.at(order.index(lx.dim))


def index_dim(node, args, loc, ctx):
    """``select``/``slice``/``narrow`` on one dim: on the batch dim only the full slice keeps
    samples apart."""
    x = first_tensor(args)
    lx = loc(x)
    if not isinstance(lx, Sample):
        return lx
    ndim = len(ctx.shape(x))
    d = norm_dim(args.get("dim", 0), ndim)
    if d != lx.dim:
        drop = node.target is aten.select.int and d < lx.dim
        return lx.at(lx.dim - drop)
    if node.target is aten.slice.Tensor and ctx.value(args.get("start")) in (None, 0) and \
            ctx.value(args.get("step", 1)) == 1 and _covers(ctx.value(args.get("end")),
                                                            ctx.shape(x)[d]):
        return lx
    return mixed(node, "selects or slices samples out of the batch")


def _covers(end, size) -> bool:
    if end is None or (isinstance(end, int) and end >= 2**62):
        return True
    return sympy.simplify(sym_expr(end) - size) == 0 if isinstance(end, (int, torch.SymInt)) \
        else False


def unsqueeze(node, args, loc, ctx):
    lx = loc(first_tensor(args))
    if not isinstance(lx, Sample):
        return lx
    d = norm_dim(args["dim"], len(ctx.shape(node)))
    return lx.at(lx.dim + (d <= lx.dim))


def _broadcast_shared(node, lx: Shared, ctx):
    """A shared value whose entries do not depend on the batch, expanded or tiled to the batch
    size at one dim, is per-sample there: every sample gets the same rows, computed from no
    sample (``buffer.expand(B, -1)``: HF token type ids; ``arange(T)[None].repeat(B, 1)``:
    Whisper's position ids). Expanded to ``K * B`` (a sample's K examples folded into the batch:
    user-level DP), every sample gets K of the identical rows: ``Sample(d, fold=K)``. Sized by
    the batch any other way, it is batchy."""
    shape = ctx.shape(node) or []
    dims = [d for d, s in enumerate(shape) if ctx.has_batch(s)]
    if len(dims) == 1:
        fold = sympy.simplify(shape[dims[0]] / ctx.symbol)
        if fold.is_Integer and fold > 0:
            return Sample(dims[0], fold=int(fold))
    return Shared(True) if dims else lx


def expand(node, args, loc, ctx):
    """A per-sample tensor keeps its layout; a shared one, see :func:`_broadcast_shared`."""
    lx = loc(first_tensor(args))
    if isinstance(lx, Shared) and not lx.batchy:
        return _broadcast_shared(node, lx, ctx)
    if not isinstance(lx, Sample):
        return lx
    shift = len(ctx.shape(node)) - len(ctx.shape(first_tensor(args)))
    return lx.at(lx.dim + shift)


def repeat(node, args, loc, ctx):
    """``x.repeat(*r)`` tiles every dim: a per-sample tensor tiled along its other dims stays
    per-sample; tiling the batch dim copies samples into other samples' rows. A shared one, see
    :func:`_broadcast_shared`."""
    x = first_tensor(args)
    lx = loc(x)
    reps = [ctx.value(r) for r in args["repeats"]]
    if isinstance(lx, Shared):
        if lx.batchy:
            return lx
        tiled = [d for d, r in enumerate(reps) if isinstance(r, torch.SymInt)
                 and ctx.has_batch(sym_expr(r))]
        lead = len(reps) - len(ctx.shape(x))
        if len(tiled) == 1 and sympy.simplify(sym_expr(reps[tiled[0]]) - ctx.symbol) == 0:
            d = tiled[0]  # B copies of the whole dim, one per sample: [b * n + j]
            n = ctx.shape(x)[d - lead] if d >= lead else 1
            return Sample(d, fold=n)
        return _broadcast_shared(node, lx, ctx)
    if not isinstance(lx, Sample):
        return lx
    d = lx.dim + len(reps) - len(ctx.shape(x))
    if not (isinstance(reps[d], int) and reps[d] == 1):
        return mixed(node, "repeats the batch dimension")
    return lx.at(d)


def split(node, args, loc, ctx):
    """``split``/``chunk`` keep every dim; ``unbind`` removes its dim, so a batch after it
    moves one dim down in the pieces."""
    x = first_tensor(args)
    lx = loc(x)
    n = len(node.meta.get("val", ()))
    if not isinstance(lx, Sample):
        return [lx] * n
    d = norm_dim(args.get("dim", 0), len(ctx.shape(x)))
    if d == lx.dim:
        return mixed(node, "splits the batch dimension")
    removed = node.target is aten.unbind.int and d < lx.dim
    return [lx.at(lx.dim - removed)] * n


def index(node, args, loc, ctx):
    """``x[i0, i1, ...]`` (advanced indexing). An ``arange(B)`` index at a batch-sized dim of
    a shared ``x`` selects rows that do not differ (shared stays shared); per-sample data in
    ``x`` or in an index is proven on the probe."""
    x = first_tensor(args)
    lx, shape = loc(x), ctx.shape(x)
    batchy = isinstance(lx, Shared) and lx.batchy
    data = isinstance(lx, Sample) and not lx.iota
    for d, idx in enumerate(args["indices"]):
        if idx is None:
            continue
        li = loc(idx)
        if isinstance(li, Shared):
            batchy = batchy or li.batchy
        elif li.iota:
            batchy = batchy or not ctx.has_batch(shape[d])
        else:
            data = True
    return PROBE if data else Shared(batchy)


def getitem(node, args, loc, ctx):
    src, i = node.args
    ls = loc(src)
    return ls[i] if isinstance(ls, list) else ls
