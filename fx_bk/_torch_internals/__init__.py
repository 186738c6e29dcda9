"""Every private (or unstable) PyTorch API fx_bk uses, behind one named helper each.

fx_bk is tested on the torch version ``pyproject.toml`` pins (2.13). When a torch upgrade breaks
something, this package is the place to look at first (``autograd_graph.py`` holds the helpers
that read the autograd graph and hooks); ``tests/test_torch_internals.py`` has one smoke test per
helper and checks that no other module of ``fx_bk/`` or ``passes/`` reaches for ``torch._*``
internals (``torch._check`` aside: documented), ``op._schema``, ``SymInt.node`` or
``Graph._codegen``.

``PRIVATE_APIS`` below is the table: helper -> (private API, what fx_bk uses it for, versions
known to work); ``docs/internals.md`` prints it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree
from torch._functorch._aot_autograd.functional_utils import from_fun, is_fun, to_fun
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .autograd_graph import (
    backward_hooks,
    current_graph_task_id,
    custom_functions,
    recording_tensor_hooks,
)
from .compat import joint_trace_shims
from .symbolic import (
    SymbolicBatchMode,
    evaluate_size_condition,
    marked_dynamic_dims,
    sym_expr,
    sym_hint,
)

__all__ = [
    "InPlaceOpTraced",
    "SymbolicBatchMode",
    "backward_hooks",
    "current_graph_task_id",
    "custom_functions",
    "data_dependent_errors",
    "decompose_to_core_aten",
    "disable_proxy_modes_tracing",
    "escape_outer_tracing",
    "evaluate_size_condition",
    "functionalize",
    "is_fake",
    "is_op_overload",
    "joint_trace_shims",
    "keep_in_forward",
    "library_decompositions",
    "make_fx",
    "mark_batch_dynamic",
    "marked_dynamic_dims",
    "mutating_ops",
    "normalize_call",
    "op_display_name",
    "op_schema",
    "partition_joint_graph",
    "propagate_fake_values",
    "recording_tensor_hooks",
    "set_flat_codegen",
    "statically_known_true",
    "stop_at_in_place_ops",
    "sym_expr",
    "sym_hint",
]

TESTED_TORCH = "2.13"

PRIVATE_APIS = {
    "SymbolicBatchMode": (
        "FakeTensorMode, ShapeEnv, StatelessSymbolicContext, DimDynamic",
        "one trace with a symbolic batch dim and static other dims", "torch 2.13"),
    "SymbolicBatchMode.specialized_batch / SymbolicBatchMode.guard_exprs": (
        "ShapeEnv.replace, ShapeEnv.guards",
        "conditions the trace placed on the batch size", "torch 2.13"),
    "escape_outer_tracing": (
        "unset_fake_temporarily, disable_proxy_modes_tracing, _disable_current_modes",
        "build fx_bk's graphs while torch.compile traces the caller", "torch 2.13"),
    "disable_proxy_modes_tracing": (
        "torch.fx.experimental.proxy_tensor.disable_proxy_modes_tracing",
        "read real sizes while AOTAutograd traces", "torch 2.13"),
    "functionalize": (
        "FunctionalTensorMode, to_fun / from_fun / is_fun, torch._sync, "
        "torch._functionalize_has_data_mutation",
        "functionalize the joint trace as AOTAutograd does", "torch 2.13"),
    "make_fx": (
        "torch.fx.experimental.proxy_tensor.make_fx (pre_dispatch=True)",
        "trace the forward and the joint graph", "torch 2.13"),
    "partition_joint_graph": (
        "torch._functorch.partitioners.min_cut_rematerialization_partition",
        "split the joint graph into forward and backward", "torch 2.13"),
    "evaluate_size_condition": (
        "torch.utils._sympy.interp.sympy_interp, PythonReferenceAnalysis",
        "re-check the trace's size guards on every call", "torch 2.13"),
    "statically_known_true": (
        "torch.fx.experimental.symbolic_shapes.statically_known_true",
        "compare SymInts without adding guards", "torch 2.13"),
    "sym_expr / sym_hint": (
        "SymInt.node.expr, SymInt.node.hint",
        "a size's sympy form and example value", "torch 2.13"),
    "is_fake": (
        "torch._subclasses.fake_tensor.is_fake",
        "is the first call inside torch.compile's tracing", "torch 2.13"),
    "set_flat_codegen": (
        "Graph._codegen = torch.fx.graph.CodeGen()",
        "flat placeholders instead of make_fx's pytree wrapping", "torch 2.13"),
    "library_decompositions": (
        "torch._decomp.get_decompositions",
        "torch's own Python decompositions of ops that pin the batch (im2col) in the BK trace",
        "torch 2.13"),
    "decompose_to_core_aten": (
        "torch._decomp.core_aten_decompositions, get_decompositions, "
        "make_fx(decomposition_table=...)",
        "parameter-only ops as core aten, whose vmap batch rules keep the batch symbolic",
        "torch 2.13"),
    "is_op_overload / op_schema / op_display_name / mutating_ops": (
        "torch._ops.OpOverload, OpOverload._schema",
        "rule lookup, the fallback rule's op filter, error messages, in-place ops in a trace",
        "torch 2.13"),
    "stop_at_in_place_ops": (
        "torch.utils._python_dispatch.TorchDispatchMode",
        "stop a plain (not functionalized) trace at its first in-place op", "torch 2.13"),
    "normalize_call": (
        "torch.fx.operator_schemas.normalize_function",
        "an op call's arguments by schema name", "torch 2.13"),
    "propagate_fake_values": (
        "torch.fx.passes.fake_tensor_prop.FakeTensorProp",
        "refresh meta['val'] after a graph edit", "torch 2.13"),
    "current_graph_task_id": (
        "torch._C._current_graph_task_id",
        "tell two backward passes apart (one clip per sample per step)", "torch 2.13"),
    "custom_functions": (
        "autograd Node._forward_cls, Node.next_functions",
        "find custom autograd.Functions whose backward the trace would drop", "torch 2.13"),
    "recording_tensor_hooks": (
        "patches torch.Tensor.register_hook while tracing",
        "find tensor hooks the trace would drop", "torch 2.13"),
    "backward_hooks": (
        "nn.Module._backward_hooks / _backward_pre_hooks, nn.modules.module._global_backward_*",
        "reject module backward hooks the trace would drop", "torch 2.13"),
    "data_dependent_errors": (
        "GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException",
        "name data-dependent control flow as a problem", "torch 2.13"),
    "keep_in_forward": (
        "torch.fx.node.has_side_effect (not backward compatible)",
        "keep fx_bk::step_token in the forward graph", "torch 2.13"),
    "mark_batch_dynamic": (
        "torch._dynamo.maybe_mark_dynamic",
        "Poisson batch sizes share one compiled graph", "torch 2.13"),
    "marked_dynamic_dims": (
        "Tensor._dynamo_dynamic_indices (set by torch._dynamo.mark_dynamic)",
        "an input's dims marked dynamic are traced symbolically in eager mode too", "torch 2.13"),
}


def private_api_table() -> str:
    """``PRIVATE_APIS`` as the markdown table of ``docs/internals.md`` (kept equal by a test)."""
    rows = ["| helper | private API | used for | known to work |", "|---|---|---|---|"]
    for helper, (api, used_for, versions) in PRIVATE_APIS.items():
        rows.append(f"| `{helper}` | `{api}` | {used_for} | {versions} |")
    return "\n".join(rows)


@contextlib.contextmanager
def escape_outer_tracing():
    """Leave any enclosing Dynamo/AOTAutograd tracing so we can trace our own graphs.

    fx_bk builds its graphs lazily on the first call, which may happen while torch.compile is
    tracing the user's model (fake tensors, proxy modes, functionalization active).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(unset_fake_temporarily())
        stack.enter_context(disable_proxy_modes_tracing())
        stack.enter_context(_disable_current_modes())
        stack.enter_context(torch.enable_grad())
        yield


def is_fake(t: torch.Tensor) -> bool:
    """Is ``t`` a fake tensor (the call is being traced by torch.compile)?"""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)


def functionalize(fn):
    """Functionalize ``fn`` the way AOTAutograd does (autograd.grad inside keeps working).

    ``torch.func.functionalize`` breaks ``requires_grad_`` / ``autograd.grad``; without
    functionalization, in-place ops reach the partitioner, which rejects them.
    """

    def wrapped(*args):
        with FunctionalTensorMode():
            fargs = pytree.tree_map_only(torch.Tensor, to_fun, args)
            outs = fn(*fargs)
            for a in pytree.tree_leaves(fargs):
                if is_fun(a):
                    torch._sync(a)
                    if torch._functionalize_has_data_mutation(a.elem):
                        raise RuntimeError(
                            "fx_bk: the model mutates one of its inputs, parameters or buffers "
                            "in place during forward; this is not supported"
                        )
            return pytree.tree_map_only(torch.Tensor, from_fun, outs)

    return wrapped


def partition_joint_graph(joint: torch.fx.GraphModule, num_fwd_outputs: int):
    """Split a joint graph (placeholders ``primals_*``/``tangents_*``) into forward and backward."""
    return min_cut_rematerialization_partition(joint, None, num_fwd_outputs=num_fwd_outputs)


def set_flat_codegen(gm: torch.fx.GraphModule) -> None:
    """Generate ``forward(self, a, b, ...)`` with flat placeholders (``make_fx`` of a function
    taking lists wraps them in pytree code), and recompile."""
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()


_SIZE_READING = [  # op packets whose vmap batch rules read sizes as ints, pinning a
    # symbolic batch: traced through their Python decompositions instead
    torch.ops.aten.embedding, torch.ops.aten.native_batch_norm,
    torch.ops.aten._native_batch_norm_legit, torch.ops.aten._native_batch_norm_legit_no_training,
    torch.ops.aten._native_batch_norm_legit_functional, torch.ops.aten.native_layer_norm,
    torch.ops.aten.native_group_norm, torch.ops.aten.index_select,
    torch.ops.aten.upsample_bilinear2d, torch.ops.aten.upsample_nearest2d,
    torch.ops.aten.upsample_bicubic2d, torch.ops.aten.upsample_linear1d,
]


def library_decompositions(packets) -> dict:
    """torch's registered Python decompositions of these op packets (every overload)."""
    from torch._decomp import get_decompositions

    return get_decompositions(packets)


def decompose_to_core_aten(gm: torch.fx.GraphModule, fake_inputs, fake_mode):
    """``gm`` re-traced as core aten ops (e.g. ``embedding`` -> ``index``, ``_weight_norm``
    -> norms and divisions), whose vmap batch rules keep the batch symbolic."""
    from torch._decomp import core_aten_decompositions

    table = {**core_aten_decompositions(), **library_decompositions(_SIZE_READING)}
    with fake_mode:
        out = make_fx(gm, decomposition_table=table)(*fake_inputs)
    set_flat_codegen(out)
    return out


def is_op_overload(target) -> bool:
    """Is ``target`` an op overload such as ``aten.linear.default``?"""
    return isinstance(target, torch._ops.OpOverload)


def op_schema(op):
    """The ``torch._C.FunctionSchema`` of an op overload."""
    return op._schema


def mutating_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of ``gm`` that update a tensor in place (an op whose schema mutates)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and is_op_overload(n.target)
            and op_schema(n.target).is_mutable]


class InPlaceOpTraced(Exception):
    """Raised under :func:`stop_at_in_place_ops` by the first op that updates a tensor in
    place."""


class _StopAtInPlaceOps(TorchDispatchMode):
    supports_higher_order_operators = True  # passed through like any op that is not in place

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_op_overload(func) and op_schema(func).is_mutable:
            raise InPlaceOpTraced(op_display_name(func))
        return func(*args, **(kwargs or {}))


def stop_at_in_place_ops(fn):
    """``fn`` run so that the first op it dispatches that updates a tensor in place raises
    :class:`InPlaceOpTraced` (under ``make_fx``: the trace stops there, before the rest is
    traced for nothing). Ops that a mode below decomposes are not seen: check the graph too
    (:func:`mutating_ops`)."""

    def wrapped(*args):
        with _StopAtInPlaceOps():
            return fn(*args)

    return wrapped


def op_display_name(target) -> str:
    """``aten.linear.default`` -> ``aten.linear``; other callables by their name."""
    if is_op_overload(target):
        return f"{target.namespace}.{op_schema(target).name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def normalize_call(target, args, kwargs) -> dict:
    """The arguments of an op call by schema name (``{}`` when it cannot be normalized)."""
    norm = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
    return dict(norm.kwargs) if norm is not None else {}


def propagate_fake_values(gm: torch.fx.GraphModule, fake_mode, fake_inputs) -> None:
    """Recompute every node's ``meta["val"]`` from ``fake_inputs`` (after a graph edit)."""
    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*fake_inputs)


def data_dependent_errors() -> tuple[type, ...]:
    """What tracing raises when the forward branches on, or sizes by, a tensor's values."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return (GuardOnDataDependentSymNode, DataDependentOutputException,
            DynamicOutputShapeException)


def keep_in_forward(op) -> None:
    """Register ``op`` as side-effecting: FX dead-code elimination (the partitioners' extraction
    of the forward graph included) keeps its calls, so an op whose output only the backward
    reads stays in the forward graph."""
    torch.fx.node.has_side_effect(op)


def mark_batch_dynamic(t: torch.Tensor) -> None:
    """Tell torch.compile that dim 0 of ``t`` varies (no recompile per batch size), without
    failing when it gets specialized anyway (sizes 0 and 1)."""
    torch._dynamo.maybe_mark_dynamic(t, 0)
