"""Pass 5: find every op that consumes a trainable parameter and give it a rule.

A trainable parameter must reach ops only as a parameter argument of an op that has a rule
(``fx_bk.rules``); any other use (an op without a rule, a view of the parameter, the parameter in
an activation slot) is a problem reported with the op, parameter, module and source line.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch

from fx_bk._torch_internals import is_op_overload, normalize_call, op_schema, sym_expr, sym_hint
from fx_bk.errors import Problem
from fx_bk.rules import RULES, fallback_rule, rule_for
from fx_bk.site import Length, Site

from .batch_locations import Mixed, Sample
from .describe import module_of, op_name, report_mixing, where
from .program import BKProgram


def supported_ops() -> str:
    names = ", ".join(sorted({r.name for r in RULES.values()}))
    if fallback_rule() is None:
        return names
    return (names + "; other ops with one tensor output by the vmap(vjp) fallback, when the "
            "per-sample gradient is small")


def _shape(value, batch_symbol) -> tuple:
    """Static dims as ints, the batch dim as "B", a dim folding the batch with others as str,
    a dynamic length free of the batch as a ``Length`` (an int: the trace's size)."""
    if not isinstance(value, torch.Tensor):
        return ()
    out = []
    for s in value.shape:
        if isinstance(s, int):
            out.append(s)
        else:
            expr = sym_expr(s)
            if expr == batch_symbol:
                out.append("B")
            elif batch_symbol in expr.free_symbols:
                out.append(str(expr))
            else:
                out.append(Length(sym_hint(s), expr))
    return tuple(out)


def find_sites(prog: BKProgram) -> None:
    placeholders = prog.placeholders()
    trainable = {
        placeholders[i]: name
        for i, (name, t) in enumerate(zip(prog.param_names, prog.trainable))
        if t
    }
    by_name = {n.name: n for n in prog.forward_graph.graph.nodes}
    trainable.update({by_name[node]: d.name for node, d in prog.derived.items()})
    derivation = {by_name[n] for n in prog.derivation_nodes}
    claimed: set[tuple[torch.fx.Node, torch.fx.Node]] = set()  # (param node, user node)
    for node in prog.forward_graph.graph.nodes:
        if node in derivation:
            continue  # an op on parameters alone: a derived value's vjp, not a site
        if node.op != "call_function":
            continue
        uses = [a for a in node.all_input_nodes if a in trainable]
        if not uses:
            continue
        rule = rule_for(node.target)
        if rule is None:
            continue
        site = _make_site(node, rule, trainable, prog.mode.batch_symbol)
        if site is None or not rule.applies(site):
            continue
        if rule.folds_batch:
            _unfold_batch(site, node, prog)
        elif rule.rows_independent:
            _group_rows(site, node, prog)
        claimed.update((p, node) for p in uses if trainable[p] in site.params.values())
        for a in node.all_input_nodes:
            if isinstance(prog.batch_locations.get(a), Mixed):
                report_mixing(prog, prog.batch_locations[a],
                              f"the input of trainable op {op_name(node)}{where(node)}")
        reason = (_in_place_problem(node) or rule.layout_problem(site)
                  or rule.validate(site))
        if reason:
            prog.problems.append(Problem("unsupported-op", _describe(site, node, reason)))
        else:
            prog.sites.append(site)

    for p_node, name in trainable.items():
        for user in p_node.users:
            if user.op == "output":
                msg = f"the model returns trainable parameter '{name}' as an output"
            elif (p_node, user) in claimed or user in derivation:
                continue
            else:
                msg = (
                    f"op {op_name(user)} consumes trainable parameter '{name}' of module "
                    f"'{module_of(name)}'{where(user)}, and fx_bk has no per-sample rule for "
                    f"that use. Supported ops: {supported_ops()}. Freeze the parameter "
                    f"(requires_grad=False) or express the layer with a supported op"
                )
            prog.problems.append(Problem("unsupported-op", msg))


def _unfold_batch(site: Site, node: torch.fx.Node, prog: BKProgram) -> None:
    """For row-wise rules (``Rule.folds_batch``), read a row tensor whose batch is not (only)
    dim 0 as batch-first, from the batch location the proof gave it
    (``passes/batch_locations``: ``Sample(dim, fold, outer)``, dim ``dim`` of size
    ``outer * B * fold``):

    * batch at dim k (``[T, B, d]``, e.g. ``nn.MultiheadAttention``);
    * batch folded with other sizes into one dim (``[B*T, d]``, HF ``Conv1D`` and OPT;
      ``[T*B, d]``; Swin's windows ``[B*nW, N, C]``, permuted before they were folded).

    Only dims the op treats as rows may hold the batch (all but ``rule.core_dims`` trailing
    ones), and the op's output must carry the batch the same way. Sets
    ``site.batch_layout = (prefix, k, n_lead)``: every batched tensor ``t`` of the site (the
    row tensor, the output and its gradient) is read as
    ``t.reshape(*prefix, *t.shape[n_lead:]).movedim(k, 0)`` flattened to ``[B, T, *rest]``
    (``"B"`` in ``prefix`` = batch) by ``build_joint.site_values``.
    """
    locs = prog.batch_locations
    role = site.rule.row_role(site)
    shape = site.shapes.get(role, ())
    args = normalize_call(node.target, node.args, node.kwargs)
    roles = site.rule.roles(node.target)
    row = next((v for k, v in args.items() if roles.get(k, k) == role), None)
    loc = locs.get(row) if isinstance(row, torch.fx.Node) else None
    if not isinstance(loc, Sample) or loc.iota or locs.get(node) != loc:
        return
    if loc.dim == 0 and loc.fold == 1 and loc.outer == 1:
        return  # already batch-first
    outer, fold = _factor(loc.outer, prog), _factor(loc.fold, prog)
    n_lead = loc.dim + 1
    if None in (outer, fold) or not all(isinstance(d, int) for d in shape[:loc.dim]):
        return  # sizes that depend on the batch: not a layout fx_bk reads
    if n_lead > len(shape) - site.rule.core_dims(site):
        return  # the batch sits in dims the op mixes: the layout error stays
    prefix = (*shape[:loc.dim], *([outer] if outer != 1 else []), "B",
              *([fold] if fold != 1 else []))
    if sum(isinstance(d, Length) for d in prefix) > 1:
        return  # two dynamic sizes around the batch: not a layout fx_bk reads
    positions = math.prod(d for d in prefix if d != "B")
    if any(isinstance(d, Length) for d in prefix):  # the one dynamic factor: "T"
        positions = Length(positions, math.prod(d.expr if isinstance(d, Length) else d
                                                for d in prefix if d != "B"))
        prefix = tuple("T" if isinstance(d, Length) else d for d in prefix)
    site.batch_layout = (prefix, prefix.index("B"), n_lead)
    for r in (role, "out"):
        site.shapes[r] = ("B", positions, *site.shapes[r][n_lead:])


def _group_rows(site: Site, node: torch.fx.Node, prog: BKProgram) -> None:
    """For rules whose op computes each row of dim 0 alone (``Rule.rows_independent``: conv,
    norms), read a batch of ``K * B`` rows where each sample owns K consecutive rows (batch
    location ``Sample(0, fold=K)``: a user's K examples folded into the batch, user-level DP)
    as per-row gradients summed per sample: ``site.row_group = K``. Every batched tensor of the
    site (its activations and output) must have exactly that layout."""
    locs = prog.batch_locations
    by_name = {n.name: n for n in node.all_input_nodes}
    nodes = {"out": node, **{r: by_name[n] for r, n in site.tensor_args.items() if n in by_name}}
    folds = set()
    for role, n in nodes.items():
        loc = locs.get(n)
        if not isinstance(loc, Sample):
            if isinstance(site.shapes.get(role, (None,))[0], str):
                return  # a batched tensor without a per-sample location: the layout error
            continue
        if loc.dim != 0 or loc.iota or sympy.sympify(loc.outer) != 1:
            return
        folds.add(sympy.sympify(loc.fold))
    if len(folds) != 1:
        return
    fold = folds.pop()
    if not fold.is_Integer or fold <= 1:
        return
    site.row_group = int(fold)
    for role in nodes:
        shape = site.shapes.get(role, ())
        if shape and isinstance(shape[0], str):
            site.shapes[role] = ("B", *shape[1:])


def _factor(size, prog: BKProgram) -> int | None:
    """A fold or outer size of a batch location as an int, a ``Length`` when it is a dynamic
    length, None when it involves the batch."""
    size = sympy.sympify(size)
    if size.is_number:
        return int(size)
    symbols = prog.mode.size_symbols
    if symbols["batch"] in size.free_symbols:
        return None
    hint = size.subs({sym: prog.trace_sizes[n] for n, sym in symbols.items()})
    return Length(int(hint), size) if hint.is_number else None


def _in_place_problem(node: torch.fx.Node) -> str | None:
    """An in-place site (``x += self.bias``) is read as ``s = x + p`` only when nothing else
    sees ``x``: a view of another tensor, or a tensor with other users, would make the value
    autograd differentiates a later version than the op's output."""
    if not (is_op_overload(node.target) and op_schema(node.target).is_mutable):
        return None
    target = node.args[0] if node.args else None
    if not isinstance(target, torch.fx.Node):
        return None
    is_view = getattr(target.target, "is_view", False) or target.target is operator.getitem
    if is_view or list(target.users) != [node]:
        return ("it updates in place a tensor that is a view or has other users; fx_bk reads "
                "an in-place parameter op only on a tensor used nowhere else. Write it out of "
                "place: x = x + p")
    return None


def _make_site(node, rule, trainable, batch_symbol) -> Site | None:
    kwargs = normalize_call(node.target, node.args, node.kwargs)
    params, tensor_args, const_args = {}, {}, {}
    shapes = {"out": _shape(node.meta.get("val"), batch_symbol)}
    roles = rule.roles(node.target)
    for name, value in kwargs.items():
        key = roles.get(name, name)
        if isinstance(value, torch.fx.Node):
            shapes[key] = _shape(value.meta.get("val"), batch_symbol)
            if rule.takes_param(key) and value in trainable:
                params[key] = trainable[value]
            if rule.needs_tensor(key, key in params):
                tensor_args[key] = value.name
        else:
            const_args[key] = value
    if not params:
        return None  # the trainable parameter sits in a non-parameter slot: reported later
    return Site(
        node=node.name, op=node.target, rule=rule, params=params,
        tensor_args=tensor_args, const_args=const_args, shapes=shapes,
    )


def _describe(site: Site, node, reason: str) -> str:
    name = next(iter(site.params.values()))
    return (
        f"op {op_name(node)} on parameter '{name}' of module '{module_of(name)}'"
        f"{where(node)}: {reason}"
    )


def summarize(prog: BKProgram) -> str:
    return f"{len(prog.sites)} sites, {len(prog.problems)} problems"
