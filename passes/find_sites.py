"""Pass 3: find every op that consumes a trainable parameter and give it a rule.

A trainable parameter must reach ops only as a parameter argument of an op that has a rule
(``fx_bk.rules``); any other use (an op without a rule, a view of the parameter, the parameter in
an activation slot) is a problem reported with the op, parameter, module and source line.
"""

from __future__ import annotations

import sympy
import torch
from torch.fx.operator_schemas import normalize_function

from fx_bk.errors import Problem
from fx_bk.rules import RULES, rule_for

from .program import BKProgram, Site

aten = torch.ops.aten


def supported_ops() -> str:
    return ", ".join(sorted({r.name for r in RULES.values()}))


def where(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return f" (at {lines[-1]})" if lines else ""


def _shape(value, batch_symbol) -> tuple:
    """Static dims as ints, the batch dim as "B", a dim folding the batch with others as str."""
    if not isinstance(value, torch.Tensor):
        return ()
    out = []
    for s in value.shape:
        if isinstance(s, int):
            out.append(s)
        else:
            out.append("B" if s.node.expr == batch_symbol else str(s.node.expr))
    return tuple(out)


def _module_of(param: str) -> str:
    return param.rpartition(".")[0] or "<root>"


def find_sites(prog: BKProgram) -> None:
    placeholders = prog.placeholders()
    trainable = {
        placeholders[i]: name
        for i, (name, t) in enumerate(zip(prog.param_names, prog.trainable))
        if t
    }
    claimed: set[tuple[torch.fx.Node, torch.fx.Node]] = set()  # (param node, user node)
    for node in prog.forward_graph.graph.nodes:
        if node.op != "call_function":
            continue
        uses = [a for a in node.all_input_nodes if a in trainable]
        if not uses:
            continue
        rule = rule_for(node.target)
        if rule is None:
            continue
        site = _make_site(node, rule, trainable, prog.mode.batch_symbol)
        if site is None:
            continue
        if rule.folds_batch:
            _unfold_batch(site, node, prog.mode.batch_symbol)
        claimed.update((p, node) for p in uses if trainable[p] in site.params.values())
        reason = _batch_layout_problem(site) or rule.validate(site)
        if reason:
            prog.problems.append(Problem("unsupported-op", _describe(site, node, reason)))
        else:
            prog.sites.append(site)

    for p_node, name in trainable.items():
        for user in p_node.users:
            if user.op == "output":
                msg = f"the model returns trainable parameter '{name}' as an output"
            elif (p_node, user) in claimed:
                continue
            else:
                msg = (
                    f"op {op_name(user)} consumes trainable parameter '{name}' of module "
                    f"'{_module_of(name)}'{where(user)}, and fx_bk has no per-sample rule for "
                    f"that use. Supported ops: {supported_ops()}. Freeze the parameter "
                    f"(requires_grad=False) or express the layer with a supported op"
                )
            prog.problems.append(Problem("unsupported-op", msg))


def op_name(node: torch.fx.Node) -> str:
    """``aten.linear.default`` -> ``aten.linear``."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}"
    return getattr(t, "__name__", str(t))


def _batch_layout_problem(site: Site) -> str | None:
    """Rules need the batch as dim 0 of the op's tensors, and nowhere else."""
    for role in (*site.tensor_args, "out"):
        shape = site.shapes[role]
        if not shape or shape[0] != "B" or any(isinstance(d, str) for d in shape[1:]):
            what = "output" if role == "out" else f"argument '{role}'"
            return (
                f"its {what} has shape {list(shape)} (B = batch size): the batch must be dim "
                f"0 and only there. A parameter applied to a tensor without the batch dim "
                f"(e.g. a positional embedding of arange(T), broadcast later) has no per-sample "
                f"gradient at this op: give it the batch dim, e.g. "
                f"pos(torch.arange(T).expand(B, T)); do not fold the batch into other dims"
            )
    return None


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.flatten.using_ints}


def _unfold_batch(site: Site, node: torch.fx.Node, batch_symbol) -> None:
    """``[B*k, d]`` -> logical ``("B", k, d)`` when the input is a row-major reshape of a tensor
    whose dim 0 is the batch (so sample i owns rows ``i*k .. i*k+k-1``), for rules that accept
    it; the op's output rows follow its input rows."""
    if "input" not in site.tensor_args:
        return
    src = next(a for a in node.all_input_nodes if a.name == site.tensor_args["input"])
    rows = src.meta["val"].shape[0] if src.meta["val"].dim() else None
    if not isinstance(rows, torch.SymInt) or rows.node.expr == batch_symbol:
        return
    k = sympy.simplify(rows.node.expr / batch_symbol)
    if not k.is_Integer or not _reshaped_from_batch(src, int(k), batch_symbol):
        return
    folded = site.shapes["input"][0]
    for role in ("input", "out"):
        if site.shapes[role][0] == folded:
            site.shapes[role] = ("B", int(k), *site.shapes[role][1:])


def _reshaped_from_batch(node: torch.fx.Node, k: int, batch_symbol) -> bool:
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
        shape = _shape(node.meta.get("val"), batch_symbol)
        if shape and shape[0] == "B":
            prefix = 1
            for d in shape[1:]:
                if prefix == k or not isinstance(d, int):
                    break
                prefix *= d
            return prefix == k
    return False


def _make_site(node, rule, trainable, batch_symbol) -> Site | None:
    norm = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    kwargs = norm.kwargs if norm is not None else {}
    params, tensor_args, const_args = {}, {}, {}
    shapes = {"out": _shape(node.meta.get("val"), batch_symbol)}
    roles = rule.roles(node.target)
    for name, value in kwargs.items():
        key = roles.get(name, name)
        if isinstance(value, torch.fx.Node):
            shapes[key] = _shape(value.meta.get("val"), batch_symbol)
            if key in rule.param_args and value in trainable:
                params[key] = trainable[value]
            elif key in rule.tensor_args:
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
        f"op {op_name(node)} on parameter '{name}' of module '{_module_of(name)}'"
        f"{where(node)}: {reason}"
    )
