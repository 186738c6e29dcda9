"""Pass 4: find the values computed from trainable parameters alone.

A model often transforms a parameter before it meets the batch: ``w.to(dtype)``, ``1 + w``
(Gemma's RMSNorm), ``gamma.reshape(1, -1, 1, 1)`` (layer scale), weight standardization,
``torch._weight_norm``, a relative-position bias table indexed by constant indices, an
embedding of relative-position buckets ``[T, T] -> [T, T, H]``. Every node whose inputs are
trainable parameters, values derived from them, or constants (frozen parameters, buffers,
unbatched inputs, tensors made in ``forward``) and whose shape does not involve the batch is
*parameter-derived*. Where such a value meets batched data (a user that is not
parameter-derived) it is a :class:`~fx_bk.site.DerivedValue`, and ``find_sites`` treats it as
a parameter:

* a chain of ops that only change dtype or copy (``.to(dtype)``, ``clone``, ``contiguous``)
  from one parameter of the same shape is the parameter itself (its site is that parameter's:
  ghost norms, ties and all);
* any other value gets its own name ``"<module>.<node>"`` (the module of its first source);
  its per-sample gradient is the site rule's, mapped back to the sources by the vjp of the
  parameter-only ops (``fx_bk/rules/derived.py``), with the norm computed by the site's rule
  directly when the chain is an isometry (views, permutes, adding a constant).

Rejected: a random op on parameters (a fresh draw at the vjp would not be the forward's),
an in-place op that writes batched data into a parameter-derived tensor.
"""

from __future__ import annotations

import enum

import torch

from fx_bk._torch_internals import (
    decompose_to_core_aten,
    is_op_overload,
    normalize_call,
    op_schema,
)
from fx_bk.errors import Problem
from fx_bk.rules.derived import Derivation
from fx_bk.site import DerivedValue

from .describe import module_of, op_name, where
from .program import BKProgram

aten = torch.ops.aten


class Dep(enum.Enum):
    CONST = "constant"  # no trainable parameter, no batch
    PARAM = "parameter-derived"  # trainable parameters (and constants), no batch
    BATCH = "batched"  # depends on the batch (its values or its size)


# value-preserving copies: through them a parameter stays itself (same shape and device)
TRANSPARENT = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
               aten.clone.default, aten.contiguous.default, aten.alias.default}
# ops whose vjp moves entries without changing their squared sum
_ISOMETRIC = TRANSPARENT | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.numpy_T.default, aten.mT.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.movedim.int, aten.neg.default,
}
_SHIFTS = {aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar}


def _has_symbols(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        return True
    vals = val if isinstance(val, (list, tuple)) else [val]
    return any(isinstance(v, torch.Tensor) and any(not isinstance(d, int) for d in v.shape)
               for v in vals)


def dependencies(prog: BKProgram) -> dict[torch.fx.Node, Dep]:
    """What every node of the forward graph depends on."""
    n_p, n_b = len(prog.param_names), len(prog.buffer_names)
    dep: dict[torch.fx.Node, Dep] = {}
    for i, node in enumerate(prog.placeholders()):
        if i < n_p:
            dep[node] = Dep.PARAM if prog.trainable[i] else Dep.CONST
        elif i < n_p + n_b:
            dep[node] = Dep.CONST
        else:
            dep[node] = Dep.BATCH if prog.inputs[i - n_p - n_b].batched else Dep.CONST
    for node in prog.forward_graph.graph.nodes:
        if node.op == "placeholder" or node.op == "output":
            continue
        ins = {dep.get(a, Dep.BATCH) for a in node.all_input_nodes}
        if Dep.BATCH in ins or _has_symbols(node) or node.op != "call_function" and ins:
            dep[node] = Dep.BATCH
        else:
            dep[node] = Dep.PARAM if Dep.PARAM in ins else Dep.CONST
    return dep


def find_derived_params(prog: BKProgram) -> None:
    dep = dependencies(prog)
    trainable = {node: name for node, name, t in
                 zip(prog.placeholders(), prog.param_names, prog.trainable) if t}
    prog.derivation_nodes = {n.name for n, d in dep.items()
                             if d is Dep.PARAM and n not in trainable}
    prog.derived = {}
    order = {n: i for i, n in enumerate(prog.forward_graph.graph.nodes)}

    def chain(node):
        return _chain(node, dep, trainable, order)

    for node in prog.forward_graph.graph.nodes:
        if node.name not in prog.derivation_nodes:
            continue
        if _is_random(node):
            prog.problems.append(_problem(node, chain(node), trainable, (
                "is a random op on trainable parameters (e.g. DropConnect); fx_bk maps "
                "per-sample gradients back through these ops and cannot replay the draw. Move "
                "the randomness to the activations")))
            continue
        if _writes_batch_into(node, dep):
            prog.problems.append(_problem(node, chain(node), trainable, (
                "is written in place with batched data, so its value mixes the parameters "
                "with samples; compute the result out of place")))
            continue
        meets_batch = any(dep.get(u) is Dep.BATCH or u.op == "output" for u in node.users)
        if meets_batch and isinstance(node.meta.get("val"), torch.Tensor):
            prog.derived[node.name] = _derived_value(node, chain(node), dep, trainable)


_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default, aten.native_dropout.default}


def _is_random(node: torch.fx.Node) -> bool:
    """A random op, except a dropout that is off (``p = 0`` or not training)."""
    if not is_op_overload(node.target) or \
            torch.Tag.nondeterministic_seeded not in node.target.tags:
        return False
    if node.target in _DROPOUTS:
        args = normalize_call(node.target, node.args, node.kwargs)
        return not (args.get("p") == 0 or args.get("train") is False)
    return True


def _writes_batch_into(node: torch.fx.Node, dep) -> bool:
    """An in-place op on batched data whose mutated argument is ``node``."""
    for user in node.users:
        if dep.get(user) is not Dep.BATCH or not is_op_overload(user.target):
            continue
        schema = op_schema(user.target)
        if schema.is_mutable and user.args and user.args[0] is node:
            return True
    return False


def _chain(node: torch.fx.Node, dep, trainable, order) -> list[torch.fx.Node]:
    """The parameter-derived ancestors of ``node`` (itself included), in graph order."""
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if dep.get(a) is Dep.PARAM and a not in trainable and a not in seen:
                seen.add(a)
                todo.append(a)
    return sorted(seen, key=order.__getitem__)


def _derived_value(node, chain, dep, trainable) -> DerivedValue:
    sources = sorted({trainable[a] for n in chain for a in n.all_input_nodes if a in trainable})
    ops = tuple(op_name(n).removeprefix("aten.") for n in chain)
    module = module_of(sources[0])
    name = f"<{node.name}>" if module == "<root>" else f"{module}.<{node.name}>"
    linear = all(len([a for a in n.all_input_nodes
                      if dep.get(a) is Dep.PARAM]) == 1 for n in chain)
    isometric = len(sources) == 1 and linear and all(_keeps_norm(n, dep) for n in chain)
    if (isometric and all(n.target in TRANSPARENT for n in chain)
            and _same_shape_and_device(chain[0].args[0], node)):
        name = sources[0]  # the parameter itself, in another dtype or a copy
    return DerivedValue(name, node.name, tuple(sources), ops, isometric)


def _same_shape_and_device(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
            and va.shape == vb.shape and va.device == vb.device)


def _keeps_norm(node: torch.fx.Node, dep) -> bool:
    """Does the vjp of ``node`` (w.r.t. its one parameter-derived input) keep the norm?"""
    if node.target in _ISOMETRIC:
        return True
    if node.target not in _SHIFTS:
        return False
    args = normalize_call(node.target, node.args, node.kwargs)
    operands = [args.get("input"), args.get("other")]
    params = [a for a in operands if isinstance(a, torch.fx.Node) and dep.get(a) is Dep.PARAM]
    if len(params) != 1:
        return False  # w + w = 2w (or w1 + w2): not a shift of one parameter by a constant
    (src,) = params
    if operands[1] is src and args.get("alpha", 1) not in (1, -1):
        return False  # c + alpha * w scales the gradient by alpha
    va, vn = src.meta.get("val"), node.meta.get("val")
    return isinstance(va, torch.Tensor) and va.shape == vn.shape  # no broadcast of w


def _problem(node, chain, trainable, what: str) -> Problem:
    sources = sorted({trainable[a] for n in chain for a in n.all_input_nodes if a in trainable})
    return Problem("unsupported-op", (
        f"op {op_name(node)}{where(node)} on trainable parameter(s) {sources} of module "
        f"'{module_of(sources[0]) if sources else '?'}' {what}"))


def summarize(prog: BKProgram) -> str:
    lines = [f"{len(prog.derived)} parameter-derived values at the batch"]
    for d in prog.derived.values():
        kind = "isometric" if d.isometric else "vmap(vjp)"
        lines.append(f"  {d.node} = {' -> '.join(d.chain)} of {list(d.sources)} [{kind}]"
                     f"{' (the parameter itself)' if d.name in d.sources else ''}")
    return "\n".join(lines)


def derivation_for(prog: BKProgram, values: list[DerivedValue]) -> Derivation:
    """The forward graph's ops from its inputs to ``values``, as a module of its own."""
    by_name = {n.name: n for n in prog.forward_graph.graph.nodes}
    placeholders = prog.placeholders()
    index = {p: k for k, p in enumerate(placeholders)}
    needed, todo = set(), [by_name[v.node] for v in values]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(node.all_input_nodes)
    graph, env = torch.fx.Graph(), {}
    inputs = sorted((n for n in needed if n in index), key=index.__getitem__)
    for n in inputs:
        env[n] = graph.placeholder(n.name)
    for n in prog.forward_graph.graph.nodes:
        if n in needed and n not in index:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[by_name[v.node]] for v in values))
    n_p = len(prog.param_names)
    sources = tuple(prog.param_names[index[n]] if index[n] < n_p and prog.trainable[index[n]]
                    else None for n in inputs)
    module = decompose_to_core_aten(torch.fx.GraphModule(prog.forward_graph, graph),
                                    [prog.fake_inputs[index[n]] for n in inputs],
                                    prog.mode.fake_mode)
    for n in module.graph.nodes:  # vmap copies in the default layouts only; values are equal
        if n.target is aten.clone.default and "memory_format" in n.kwargs:
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "memory_format"}
    module.recompile()
    return Derivation(module, tuple(values), tuple(index[n] for n in inputs), sources)
