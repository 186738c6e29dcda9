"""Every private PyTorch API fx_bk uses, in one place.

fx_bk is tested against the torch version pinned in CI (2.13.0). When a torch upgrade breaks
something, this is the file to look at first.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree
from torch._functorch._aot_autograd.functional_utils import from_fun, is_fun, to_fun
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
    statically_known_true,
)
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._sympy.interp import sympy_interp
from torch.utils._sympy.reference import PythonReferenceAnalysis

__all__ = [
    "SymbolicBatchMode",
    "disable_proxy_modes_tracing",
    "statically_known_true",
    "evaluate_batch_condition",
    "escape_outer_tracing",
    "functionalize",
    "make_fx",
    "partition_joint_graph",
]


class SymbolicBatchMode:
    """A fake-tensor mode whose tensors have a symbolic batch dimension (dim 0) and static rest.

    All batched tensors share one batch symbol, so one trace serves every batch size. Plain
    ``make_fx(tracing_mode="symbolic")`` is not used: it makes every dim symbolic with duck sizing
    (a dim equal to B would share B's symbol).
    """

    def __init__(self) -> None:
        self.shape_env = ShapeEnv()
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=False)
        self._batch_source = None
        self._batch_symbol = None

    def fake(self, t: torch.Tensor, *, batched: bool) -> torch.Tensor:
        """A fake copy of ``t``; ``batched``: dim 0 is the (shared) symbolic batch size."""
        if batched and self._batch_source is not None:
            with self.fake_mode:  # reuse the batch symbol: same SymInt, no equality guard
                return torch.empty(
                    (self._batch_source, *t.shape[1:]), dtype=t.dtype, device=t.device
                )
        dims = [DimDynamic.STATIC] * t.dim()
        if batched:
            dims[0] = DimDynamic.DYNAMIC
        ctx = StatelessSymbolicContext(dynamic_sizes=dims)
        out = self.fake_mode.from_tensor(t, symbolic_context=ctx)
        if batched:
            self._batch_source = out.shape[0]
            self._batch_symbol = out.shape[0].node.expr  # before any later specialization
        return out

    @property
    def batch_symbol(self):
        """The sympy symbol of the batch size (None if no input is batched)."""
        return self._batch_symbol


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


def evaluate_batch_condition(expr, symbol, batch) -> bool:
    """A sympy condition on the batch symbol, at ``batch`` (int, or SymInt: then a guard)."""
    return bool(sympy_interp(PythonReferenceAnalysis, {symbol: batch}, expr))
