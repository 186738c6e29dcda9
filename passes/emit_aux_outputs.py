"""Pass 7: make the forward graph also return every site's activations and output.

After this pass the forward graph returns ``(*user_outputs, *aux)``; ``site.aux`` maps each of the
site's roles (``"input"``, ``"indices"``, …, and ``"out"`` for the op's output ``s``) to its index
in ``aux``. The joint differentiates the user outputs w.r.t. the ``"out"`` tensors only.

NOTE [in-place ops and sites]: an in-place op (``ReLU(inplace=True)``, ``x += …``,
``h[..., :2].mul_(2)`` through a view) on a site's output or activation changes the value fx_bk
would read, and autograd would return the gradient w.r.t. the *updated* tensor: a silently
wrong per-sample gradient. So (1) a site's output updated later is copied right after the op
and every later user reads the copy; (2) an activation updated at any time — before the op
through a view (the op then reads the updated base), or after it — is copied right before the
op, so fx_bk reads exactly what the op read.
"""

from __future__ import annotations

import operator

import torch

from fx_bk._torch_internals import is_op_overload, op_schema

from .program import BKProgram

aten = torch.ops.aten


def _aliases(node: torch.fx.Node) -> set[torch.fx.Node]:
    """``node`` and every view of it (transitively)."""
    out, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if getattr(user.target, "is_view", False) and user not in out:
                out.add(user)
                todo.append(user)
            elif user.target is operator.getitem and user not in out:
                out.add(user)  # pieces of chunk/split/unbind are views too
                todo.append(user)
    return out


def _mutating_users(node: torch.fx.Node):
    """The ops that update ``node`` (or a view of it) in place."""
    return (user for alias in _aliases(node) for user in alias.users
            if is_op_overload(user.target) and op_schema(user.target).is_mutable)


def _mutated_after(node: torch.fx.Node, after: torch.fx.Node, order: dict) -> bool:
    """Is ``node`` (or a view of it) updated in place by ``after`` or a later op?"""
    return any(order.get(user, -1) >= order[after] for user in _mutating_users(node))


def _mutated(node: torch.fx.Node) -> bool:
    """Is ``node`` (or a view of it) updated in place anywhere in the graph?"""
    return any(True for _ in _mutating_users(node))


def emit_aux_outputs(prog: BKProgram) -> None:
    graph = prog.forward_graph.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    # 1. a site's output updated later in place keeps its value: later users read a copy
    copied: dict[torch.fx.Node, torch.fx.Node] = {}
    for site in prog.sites:
        node = by_name[site.node]
        if _mutated_after(node, node, order):
            with graph.inserting_after(node):
                copy = graph.call_function(aten.clone.default, (node,))
                copy.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
            copied[node] = copy
    # 2. each activation as the op read it: a tensor updated in place at any time (before the
    # op, through a view of it, or after) is copied right before the op
    aux: list[torch.fx.Node] = []
    for site in prog.sites:
        node = by_name[site.node]
        for role, name in site.tensor_args.items():
            act = copied.get(by_name[name], by_name[name])
            if _mutated(act):
                with graph.inserting_before(node):
                    snapshot = graph.call_function(aten.clone.default, (act,))
                    snapshot.meta["val"] = by_name[name].meta.get("val")
                act = snapshot
            site.aux[role] = len(aux)
            aux.append(act)
        site.aux["out"] = len(aux)
        aux.append(node)
    output = graph.output_node()
    outs = list(output.args[0])
    output.args = (outs + aux,)
    prog.num_aux_outputs = len(aux)
    graph.lint()
    prog.forward_graph.recompile()


LOGGED_GRAPHS = ("forward_graph",)


def summarize(prog: BKProgram) -> str:
    return f"{prog.num_aux_outputs} auxiliary outputs"
