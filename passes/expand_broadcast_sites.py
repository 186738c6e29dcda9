"""Pass 2: give the batch dim to sites whose output is broadcast over the batch.

``wpe(position_ids)`` with ``position_ids: [1, T]`` (Hugging Face GPT-2, BERT) or ``[T]`` yields a
``[1, T, d]`` / ``[T, d]`` output that a later ``add`` broadcasts over the batch. At the op
itself the samples are not separable (autograd would sum their gradients), so the op's
non-batched tensor arguments are expanded to ``[B, ...]``: its output becomes ``[B, T, d]``,
identical to what the broadcast produced. Only done when every user of the output is an
elementwise add/sub/mul whose output shape stays exactly the same (checked by re-propagating
shapes); otherwise ``find_sites`` reports the site.
"""

from __future__ import annotations

import operator

import sympy
import torch

from fx_bk._torch_internals import normalize_call, propagate_fake_values, sym_expr
from fx_bk.rules import rule_for

from .program import BKProgram

aten = torch.ops.aten
_BROADCASTING = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor}
# shape-preserving, per-element and deterministic: what passes through them is unchanged
_PASSTHROUGH = {aten.to.dtype_layout, aten.to.dtype, aten.to.device, aten._to_copy.default,
                aten.alias.default, aten.clone.default, aten.contiguous.default}


def _final_users(node) -> list:
    """The users of ``node``, looking through pass-through ops (``.to(device)``, ``alias``…)."""
    out = []
    for user in node.users:
        out.extend(_final_users(user) if user.target in _PASSTHROUGH else [user])
    return out


def _is_batched(node, sym) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(
        isinstance(d, torch.SymInt) and sym in sym_expr(d).free_symbols for d in val.shape
    )


def _candidates(prog: BKProgram, trainable: set):
    sym = prog.mode.batch_symbol
    for node in prog.forward_graph.graph.nodes:
        rule = rule_for(node.target, fallback=False) if node.op == "call_function" else None
        if rule is None or not any(a in trainable for a in node.all_input_nodes):
            continue
        if _is_batched(node, sym) or not node.users:
            continue
        users = _final_users(node)
        if users and all(u.target in _BROADCASTING and _is_batched(u, sym) for u in users):
            yield node, rule


def expand_broadcast_sites(prog: BKProgram) -> None:
    sym = prog.mode.batch_symbol
    if sym is None:
        return
    placeholders = prog.placeholders()
    trainable = {placeholders[i] for i, t in enumerate(prog.trainable) if t}
    batched = placeholders[prog.first_batched_input()]
    graph = prog.forward_graph.graph
    before = {n: tuple(n.meta["val"].shape) for n in graph.nodes
              if isinstance(n.meta.get("val"), torch.Tensor)}
    changed = []
    for node, rule in list(_candidates(prog, trainable)):
        user_rank = min(u.meta["val"].dim() for u in _final_users(node))
        lead = user_rank - node.meta["val"].dim()  # 1: [T, d] -> [B, T, d]; 0: [1, T, d]
        if lead not in (0, 1):
            continue
        fold = _fold(node, sym)
        if fold is None:
            continue
        with graph.inserting_before(node):
            batch = graph.call_function(aten.sym_size.int, (batched, 0))
            if fold != 1:  # the users' dim 0 is B * fold (user-level DP: [U*K, T, d])
                batch = graph.call_function(operator.mul, (batch, fold))
            for arg in node.all_input_nodes:
                if arg in trainable or arg not in _tensor_args(node, rule):
                    continue
                rank = arg.meta["val"].dim()
                src = graph.call_function(aten.unsqueeze.default, (arg, 0)) if lead else arg
                size = [batch, *[-1] * (rank if lead else rank - 1)]  # -1: the size it has
                node.replace_input_with(arg, graph.call_function(aten.expand.default, (src, size)))
        changed.append(node)
    if not changed:
        return
    prog.forward_graph.recompile()
    propagate_fake_values(prog.forward_graph, prog.mode.fake_mode, prog.fake_inputs)
    for node in changed:
        for user in _final_users(node):
            if tuple(user.meta["val"].shape) != before[user]:
                raise AssertionError(f"fx_bk: expanding {node} changed {user}'s shape")


def _fold(node, sym) -> int | None:
    """The users' dim 0 as a multiple of the batch symbol: ``B`` -> 1, ``K*B`` (examples folded
    into the batch) -> K; None when it is neither (not a layout this pass expands to)."""
    sizes = {sym_expr(u.meta["val"].shape[0]) if isinstance(u.meta["val"].shape[0], torch.SymInt)
             else None for u in _final_users(node)}
    if len(sizes) != 1 or None in sizes:
        return None
    factor = sympy.simplify(sizes.pop() / sym)
    return int(factor) if factor.is_Integer and factor > 0 else None


def _tensor_args(node, rule) -> set:
    """The op's non-parameter tensor arguments that the rule reads."""
    roles = rule.roles(node.target)
    return {v for k, v in normalize_call(node.target, node.args, node.kwargs).items()
            if isinstance(v, torch.fx.Node) and rule.needs_tensor(roles.get(k, k), False)}


def summarize(prog: BKProgram) -> str:
    return f"forward graph {len(prog.forward_graph.graph.nodes)} nodes"
