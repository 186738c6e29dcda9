"""The values of the batch-location lattice, and what every op-family rule reads."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import sympy
import torch

from fx_bk._torch_internals import sym_expr

aten = torch.ops.aten

@dataclass(frozen=True)
class Shared:
    batchy: bool = False


@dataclass(frozen=True)
class Sample:
    dim: int
    fold: Any = 1  # elements of one sample per outer block along ``dim`` (free of the batch)
    iota: bool = False
    outer: Any = 1  # blocks before the batch in ``dim``: its size is ``outer * B * fold``

    def at(self, dim: int) -> Sample:
        """The same layout, the batch moved to ``dim``."""
        return replace(self, dim=dim)

    @property
    def layout(self) -> tuple:
        """What two per-sample operands must share to line up: (fold, outer)."""
        return sympy.simplify(self.fold), sympy.simplify(self.outer)


@dataclass(frozen=True)
class Loss:
    reduction: str  # "mean" or "sum"
    guards: tuple = ()  # loss ops whose mean is over labelled entries (checked on every call)


@dataclass(frozen=True)
class Mixed:
    origin: Any  # the fx node that mixed samples
    why: str


SHARED = Shared()


PROBE = object()  # "this table does not know the op: prove it on a probe"


class Context:
    """What the transfer functions need besides the inputs' locations."""

    def __init__(self, symbol):
        self.symbol = symbol

    def shape(self, node) -> list | None:
        return self.shape_of_val(node.meta.get("val") if isinstance(node, torch.fx.Node)
                                 else None)

    @staticmethod
    def shape_of_val(val) -> list | None:
        return [sym_expr(s) for s in val.shape] if isinstance(val, torch.Tensor) else None

    @staticmethod
    def value(x):
        """A graph argument's traced value (a node's ``meta["val"]``), else the argument."""
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x

    def batch_valued(self, x) -> bool:
        """Is ``x`` (an argument) a number that depends on the batch size?"""
        v = self.value(x)
        return isinstance(v, torch.SymInt) and self.has_batch(sym_expr(v))

    def has_batch(self, expr) -> bool:
        return self.symbol in sympy.sympify(expr).free_symbols

    def fold_of(self, size) -> Any:
        """``size / B`` when ``size`` is ``B * fold`` with ``fold`` free of ``B``, else None."""
        q = sympy.simplify(sympy.sympify(size) / self.symbol)
        return None if self.has_batch(q) else q


def mixed(node, why: str) -> Mixed:
    return Mixed(node, why)


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def norm_dims(dims, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return [norm_dim(d, max(ndim, 1)) for d in dims]


def first_tensor(args):
    """The op's first tensor (schema name ``self``; normalized calls name it ``input``)."""
    return args.get("input", args.get("self"))


def arg_nodes(args) -> list:
    out = []
    for v in args.values():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, torch.fx.Node):
                out.append(x)
    return out


def arg_values(args) -> list:
    out = []
    for v in args.values():
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


class UnknownForm(Exception):
    pass
