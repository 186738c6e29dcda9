"""Pass 1: trace the model's forward into an aten graph with a symbolic batch dimension.

Pre-dispatch tracing keeps the ops at the level users write them (``aten.linear``,
``aten.embedding``, ``aten.layer_norm``, ``aten.scaled_dot_product_attention``), which is where
the per-sample rules are defined. Placeholders: parameters, buffers, tensor inputs, in that order.

Under autocast the trace holds no casts (they happen below pre-dispatch); the node values carry
the autocast dtypes. The trace runs under ``prog.autocast`` exactly (see ``fx_bk/autocast.py``).
"""

from __future__ import annotations

import torch

from fx_bk._torch_internals import (
    SymbolicBatchMode,
    backward_hooks,
    custom_functions,
    data_dependent_errors,
    is_op_overload,
    make_fx,
    normalize_call,
    op_schema,
    recording_tensor_hooks,
    set_flat_codegen,
)
from fx_bk.autocast import entered
from fx_bk.errors import FxBkError, Problem, UnsupportedModelError
from fx_bk.layout import flatten, unflatten
from fx_bk.module_state import kept_tensor_attributes, swapped_state
from fx_bk.site import SizeGuard
from fx_bk.trace_decompositions import TRACE_DECOMPOSITIONS
from fx_bk.user_code import user_frame

from .describe import op_name, shared_input_hint, where
from .program import BKProgram


def example_tensor(meta, batch: int) -> torch.Tensor:
    shape = (batch, *meta.shape[1:]) if meta.batched else meta.shape
    return torch.empty(shape, dtype=meta.dtype, device=meta.device)


def trace_model(prog: BKProgram) -> None:
    model = prog.model
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    n_p, n_b = len(prog.param_names), len(prog.buffer_names)
    batch = max(2, next((m.shape[0] for m in prog.inputs if m.batched), 2))

    mode = SymbolicBatchMode()
    flat = [mode.fake(params[n], batched=False) for n in prog.param_names]
    flat += [mode.fake(buffers[n], batched=False) for n in prog.buffer_names]
    flat += [mode.fake(example_tensor(m, batch), batched=m.batched, dynamic=m.dynamic)
             for m in prog.inputs]

    out_layout = []

    def forward(flat_args):
        state = dict(zip(prog.param_names, flat_args[:n_p]))
        state.update(zip(prog.buffer_names, flat_args[n_p : n_p + n_b]))
        (args, kwargs), _ = unflatten(prog.input_layout, flat_args[n_p + n_b :])
        with swapped_state(model, state):  # also modules registered under two names
            try:
                out = model(*args, **kwargs)
            except (FxBkError, *data_dependent_errors()):
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise _ModelCodeFailed(e) from e  # the model's code, not fx_bk's
        leaves: list = []
        out_layout.append(flatten(out, leaves, outputs=True))
        functions.extend(custom_functions(leaves))  # the autograd graph tracing recorded
        return leaves

    functions: list[str] = []
    hooks: list[str] = []
    try:
        with mode.fake_mode, entered(prog.autocast), recording_tensor_hooks(hooks), \
                kept_tensor_attributes(model):
            gm = make_fx(forward, pre_dispatch=True, record_stack_traces=True,
                         decomposition_table=TRACE_DECOMPOSITIONS)(flat)
    except data_dependent_errors() as e:
        raise UnsupportedModelError([Problem(
            "data-dependent",
            f"the forward reads the values of a tensor to decide what to compute (Python "
            f"control flow on a tensor, .item(), .tolist(), nonzero, a data-dependent size; "
            f"at {user_frame(e)}): fx_bk traces one program for every batch and cannot "
            f"follow it. Compute both branches and select with torch.where, or move the "
            f"decision out of forward",
        )]) from e
    except (_ModelCodeFailed, RuntimeError) as failure:  # e.g. a kernel's meta function
        e = failure.error if isinstance(failure, _ModelCodeFailed) else failure
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        where_ = user_frame(e)
        hint = (" Hugging Face mixture-of-experts layers: build the model with "
                "experts_implementation=\"batched_mm\" (or call "
                "model.set_experts_implementation(\"batched_mm\")), whose per-token gathered "
                "expert weights fx_bk clips exactly." if "grouped_mm" in where_ + first else "")
        raise UnsupportedModelError([Problem(
            "trace-failed",
            f"tracing the forward with a symbolic batch failed at {where_}: {first}. "
            f"fx_bk traces one program for every batch size on fake tensors; an op whose meta "
            f"kernel rejects these inputs cannot be traced. If the model runs with these inputs "
            f"without fx_bk, that op is not supported: freeze its module or replace it.{hint}",
        )]) from e
    prog.problems.extend(_custom_gradient_problems(model, functions, hooks))
    set_flat_codegen(gm)  # flat placeholders, no pytree wrapping
    prog.mode = mode
    prog.trace_batch = batch
    prog.trace_sizes = {"batch": batch, **{n: m.shape[k] for m in prog.inputs
                                           for k, n in m.dynamic}}
    prog.fake_inputs = flat
    prog.forward_graph = gm
    prog.output_layout = out_layout[-1]
    prog.num_outputs = sum(1 for n in gm.graph.output_node().args[0])
    _check_size_guards(prog)
    _check_state_mutations(prog)


class _ModelCodeFailed(Exception):
    """An exception the model's own forward raised on the traced (fake) tensors."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _custom_gradient_problems(model, functions: list[str], hooks: list[str]) -> list[Problem]:
    """Gradients the traced forward ops do not give: fx_bk differentiates those ops, so a
    custom backward, a gradient hook or a module backward hook would be silently dropped."""
    found = [f"custom autograd.Function {name}" for name in dict.fromkeys(functions)]
    found += [f"a tensor hook (Tensor.register_hook, {frame})" for frame in dict.fromkeys(hooks)]
    found += [f"a backward hook on module '{name}'" for name in backward_hooks(model)]
    hint = {True: " (torch.utils.checkpoint with use_reentrant=True: use use_reentrant=False)"}
    return [Problem(
        "custom-gradient",
        f"{what} changes gradients in a way the traced forward does not show"
        f"{hint.get('CheckpointFunction' in what, '')}; fx_bk differentiates the traced ops, "
        f"so it would be silently dropped. Express it with differentiable ops, or keep it "
        f"outside the fx_bk module",
    ) for what in found]


def _check_size_guards(prog: BKProgram) -> None:
    """Record the conditions the trace placed on the symbolic sizes (the runtime re-checks
    them per call and traces again where one fails)."""
    sym = prog.mode.batch_symbol
    if sym is None:
        prog.problems.append(Problem(
            "no-batch-input",
            "no tensor input was found to carry the batch dimension (dim 0); pass the batch as "
            "a tensor argument of forward()",
        ))
        return
    fixed = prog.mode.specialized_batch()
    if fixed is not None:
        prog.problems.append(Problem(
            "batch-size-specialized",
            f"the forward only works for batch size {fixed} (e.g. a reshape "
            f"to a fixed batch size); use -1 or x.shape[0] for the batch dimension"
            f"{shared_input_hint(prog)}",
        ))
        return
    guards, problems = size_guards(prog)
    prog.size_guards = guards
    prog.problems.extend(problems)


def size_guards(prog: BKProgram) -> tuple[list[SizeGuard], list[Problem]]:
    """Every condition tracing placed so far on the symbolic sizes, as guards the runtime
    re-checks per call (also after the joint trace: a rule may add some), and problems for
    conditions on sizes fx_bk does not trace symbolically."""
    names = {s: n for n, s in prog.mode.size_symbols.items()}
    guards, problems = [], []
    for expr in prog.mode.guard_exprs() + prog.mode.length_specializations():
        free = expr.free_symbols
        if not free & names.keys():
            continue
        if not free <= names.keys():
            problems.append(Problem(
                "batch-size-specialized",
                f"tracing the forward produced the condition {expr} relating the batch size to "
                f"sizes fx_bk does not trace symbolically; only the batch and the dynamic dims "
                f"may vary between calls",
            ))
            continue
        guards.append(SizeGuard(tuple((names[s], s) for s in free), expr))
    return guards, problems


def _mutated_placeholder(node: torch.fx.Node) -> torch.fx.Node | None:
    """The graph input a written argument is (a view of), if any."""
    while node.op == "call_function" and getattr(node.target, "is_view", False):
        node = node.all_input_nodes[0]
    return node if node.op == "placeholder" else None


def _check_state_mutations(prog: BKProgram) -> None:
    """An in-place update of a parameter, buffer or input in forward (a running statistic, a
    step counter) is state the step would change once per trace and per check, not per call:
    rejected, naming what is written and where."""
    placeholders = prog.placeholders()
    names = [*(f"parameter '{n}'" for n in prog.param_names),
             *(f"buffer '{n}'" for n in prog.buffer_names),
             *(f"input {i}" for i in range(len(prog.inputs)))]
    for node in prog.forward_graph.graph.nodes:
        if node.op != "call_function" or not is_op_overload(node.target):
            continue
        schema = op_schema(node.target)
        if not schema.is_mutable:
            continue
        args = normalize_call(node.target, node.args, node.kwargs)
        written = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
        for arg in written:
            value = args.get("input" if arg == "self" and "self" not in args else arg)
            target = _mutated_placeholder(value) if isinstance(value, torch.fx.Node) else None
            if target is None:
                continue
            what = names[placeholders.index(target)]
            prog.problems.append(Problem(
                "mutates-state",
                f"the forward updates {what} in place (op {op_name(node)}{where(node)}): "
                f"fx_bk traces the forward once and runs it again to check it, so state "
                f"updated during forward is not supported; update it outside the model's "
                f"forward, or keep it out of the graph",
            ))


LOGGED_GRAPHS = ("forward_graph",)


def summarize(prog: BKProgram) -> str:
    guards = [str(g.expr) for g in prog.size_guards]
    return (f"forward graph {len(prog.forward_graph.graph.nodes)} nodes, {prog.num_outputs} "
            f"outputs, traced at batch {prog.trace_batch}, size guards {guards}")
