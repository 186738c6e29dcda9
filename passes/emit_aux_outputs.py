"""Pass 7: make the forward graph also return every site's activations and output.

After this pass the forward graph returns ``(*user_outputs, *aux)``; ``site.aux`` maps each of the
site's roles (``"input"``, ``"indices"``, …, and ``"out"`` for the op's output ``s``) to its index
in ``aux``. The joint differentiates the user outputs w.r.t. the ``"out"`` tensors only.

NOTE [in-place ops after a site]: a later in-place op (``ReLU(inplace=True)``, ``x += …``) on an
activation or on the site's output (or a view of them) would change the value fx_bk reads, and
autograd would return the gradient w.r.t. the *mutated* tensor: a silently wrong per-sample
gradient. Such values are cloned at the site: the activation before the op, the output right
after it, with every other user redirected to the clone.
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


def _mutated_after(node: torch.fx.Node, after: torch.fx.Node, order: dict) -> bool:
    for alias in _aliases(node):
        for user in alias.users:
            mutable = is_op_overload(user.target) and op_schema(user.target).is_mutable
            if mutable and order[user] >= order[after]:
                return True
    return False


def emit_aux_outputs(prog: BKProgram) -> None:
    graph = prog.forward_graph.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    aux: list[torch.fx.Node] = []
    for site in prog.sites:
        node = by_name[site.node]
        for role, name in site.tensor_args.items():
            act = by_name[name]
            if _mutated_after(act, node, order):
                with graph.inserting_before(node):
                    act = graph.call_function(aten.clone.default, (act,))
                    act.meta["val"] = by_name[name].meta.get("val")
            site.aux[role] = len(aux)
            aux.append(act)
        if _mutated_after(node, node, order):
            with graph.inserting_after(node):
                copy = graph.call_function(aten.clone.default, (node,))
                copy.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
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
