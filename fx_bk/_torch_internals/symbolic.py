"""The door's helpers for symbolic sizes: the fake-tensor mode fx_bk traces in, and reading,
evaluating and marking sizes (see ``__init__.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.utils._sympy.interp import sympy_interp
from torch.utils._sympy.reference import PythonReferenceAnalysis


class SymbolicBatchMode:
    """A fake-tensor mode whose tensors have a symbolic batch dimension (dim 0) and static rest.

    All batched tensors share one batch symbol, so one trace serves every batch size. Plain
    ``make_fx(tracing_mode="symbolic")`` is not used: it makes every dim symbolic with duck sizing
    (a dim equal to B would share B's symbol).
    """

    def __init__(self) -> None:
        self.shape_env = ShapeEnv(duck_shape=False)  # a symbol per size, never by value
        # real tensors the forward reads from plain attributes become constants of the trace
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self._batch_source = None
        self._batch_symbol = None
        self._sizes: dict[str, torch.SymInt] = {}  # dynamic dims' symbols by name
        self._dims: dict[str, Any] = {}  # name -> sympy symbol, before any specialization

    def fake(self, t: torch.Tensor, *, batched: bool, dynamic=()) -> torch.Tensor:
        """A fake copy of ``t``; ``batched``: dim 0 is the (shared) symbolic batch size;
        ``dynamic``: ``(dim, name)`` pairs of further symbolic dims, one symbol per name."""
        names = dict(dynamic)
        if batched:
            names[0] = "batch"
        dims = [DimDynamic.DYNAMIC if d in names else DimDynamic.STATIC for d in range(t.dim())]
        ctx = StatelessSymbolicContext(dynamic_sizes=dims)
        out = self.fake_mode.from_tensor(t, symbolic_context=ctx)
        shape = list(out.shape)
        reused = False
        for d, name in names.items():
            if name in self._sizes:  # reuse the symbol: same SymInt, no equality guard
                shape[d], reused = self._sizes[name], True
            else:
                self._sizes[name] = out.shape[d]
                self._dims[name] = out.shape[d].node.expr
        if reused:
            with self.fake_mode:
                out = torch.empty(shape, dtype=t.dtype, device=t.device)
        if batched:
            self._batch_source = self._sizes["batch"]
            self._batch_symbol = self._dims["batch"]
        return out

    @property
    def size_symbols(self) -> dict[str, Any]:
        """Every symbolic size's sympy symbol by name (``"batch"``, the dynamic dims')."""
        return dict(self._dims)

    @property
    def batch_symbol(self):
        """The sympy symbol of the batch size (None if no input is batched)."""
        return self._batch_symbol

    def specialized_batch(self):
        """The value tracing pinned the batch symbol to (a sympy expression), or None when the
        batch stayed symbolic."""
        sym = self._batch_symbol
        value = self.shape_env.replace(sym)
        return None if value == sym else value

    def length_specializations(self) -> list:
        """``Eq(symbol, value)`` for each dynamic dim (not the batch) that tracing pinned to
        a value or to another size (a reshape to a fixed length, two lengths compared)."""
        import sympy

        out = []
        for name, sym in self._dims.items():
            value = self.shape_env.replace(sym)
            if name != "batch" and value != sym:
                out.append(sympy.Eq(sym, value))
        return out

    def guard_exprs(self) -> list:
        """Every condition tracing placed on the sizes, as sympy booleans (simplified)."""
        return [self.shape_env.replace(g.expr) for g in self.shape_env.guards]


def marked_dynamic_dims(t: torch.Tensor) -> set:
    """The dims of ``t`` marked with ``torch._dynamo.mark_dynamic`` (eager: fx_bk traces them
    symbolically, as torch.compile would)."""
    return set(getattr(t, "_dynamo_dynamic_indices", ()))


def sym_expr(size):
    """The sympy expression of a size (a SymInt's; an int as a sympy Integer)."""
    import sympy

    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def sym_hint(size) -> int:
    """A size's example value: the int itself, or the hint of a SymInt."""
    return size if isinstance(size, int) else int(size.node.hint)


def evaluate_size_condition(expr, values: dict) -> bool:
    """A sympy condition on size symbols at ``values`` (symbol -> int, or SymInt: then the
    check becomes a guard of the enclosing torch.compile trace)."""
    return bool(sympy_interp(PythonReferenceAnalysis, values, expr))
