"""The contract between the passes and the rules: what a *site* is, and what a rule receives.

A **site** is one op of the traced forward graph that consumes a trainable parameter
(``aten.linear`` of a Linear's weight and bias, ``aten.embedding`` of a table, …). The passes
build :class:`Site` from the graph (``passes/find_sites.py``) and a rule reads it to plan
(``site.strategy``, ``site.cost``); inside the joint graph the rule receives the site's runtime
tensors as :class:`SiteValues` and returns per-sample norms and clipped gradients.

Shapes in a site use ``"B"`` for the batch dim; every other dim is an ``int`` (a ``str`` marks
a dim folding the batch with other sizes, e.g. ``"3*s0"`` for ``[B*T, d]`` before
``find_sites`` unfolds it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ._torch_internals import evaluate_size_condition

if TYPE_CHECKING:  # the rules import this module, not the reverse
    from .rules.base import Rule


class Strategy(str, enum.Enum):
    """How a site's per-sample gradient norm (and clipped sum) is computed."""

    RANK_ONE = "rank-one"  # T = 1: ||a||^2 ||g||^2
    GHOST = "ghost"  # <a a^T, g g^T>, no per-sample gradient built
    # a convolution's ghost norm with a a^T summed from the Gram of input positions, no im2col
    GHOST_GRAM = "ghost (position Grams)"
    INSTANTIATE = "instantiate"  # the per-sample gradients [B, *p.shape] are built
    # a dynamic length: ghost while T <= site.max_ghost_positions, else instantiated norms
    # (chosen per call by fx_bk::gemm_norm_by_length); the clipped sum is one GEMM either way
    BY_LENGTH = "ghost or instantiate, by T per call"
    BIAS_ONLY = "bias-only"  # only the bias trains
    VMAP_VJP = "vmap(vjp)"  # the fallback rule: vmap of the op's vjp, instantiated
    SHARED = "instantiate (shared parameter)"  # a parameter shared by sites of different rules
    DERIVED = "instantiate, vmap(vjp) to the parameters"  # a value computed from parameters

    __hash__ = str.__hash__  # equal to its string, in sets and dicts too

    def __str__(self) -> str:
        return self.value


def is_dynamic(shape: tuple) -> bool:
    """Does a site shape have a dynamic length (besides the batch)?"""
    return any(isinstance(d, Length) for d in shape)


def per_sample_numel(shape: tuple) -> int:
    """Elements per sample of a site shape (``"B"`` marks the batch dim)."""
    n = 1
    for d in shape:
        n *= 1 if d == "B" else d
    return n


@dataclass
class Site:
    """One op in the forward graph that consumes at least one trainable parameter."""

    node: str  # name of the op's node in the forward graph
    op: Any  # the op overload, e.g. torch.ops.aten.linear.default
    rule: Rule  # the rule that computes its per-sample norm and clipped gradients
    params: dict[str, str]  # role ("weight", "bias") -> parameter name, trainable only
    tensor_args: dict[str, str]  # role -> node name of the activations the rule needs
    const_args: dict[str, Any]  # the op's other arguments (e.g. normalized_shape, eps)
    # role/"out" -> shape with "B" for the batch dim, a ``Length`` for a dynamic one
    shapes: dict[str, tuple]
    strategy: Strategy | str = ""  # chosen by the rule's plan()
    cost: int = 0  # multiply-adds per sample of the chosen strategy
    bundle_note: str = ""  # how a parameter shared with other sites is handled, if it is
    batch_layout: tuple | None = None  # see find_sites._unfold_batch; None: batch-first
    # K consecutive rows of dim 0 are one sample's (its examples folded into the batch: user-
    # level DP); the rule computes per-row gradients, summed per sample (find_sites._group_rows)
    row_group: int = 1
    aux: dict[str, int] = field(default_factory=dict)  # role/"out" -> index among aux outputs
    max_ghost_positions: int = 0  # BY_LENGTH: the largest T computed by the ghost norm


@dataclass(frozen=True)
class DerivedValue:
    """A value computed from trainable parameters alone (``1 + w``, ``w.reshape(1, -1, 1, 1)``,
    a standardized conv weight, a bias table indexed by constant indices) where it meets
    batched data. Sites name it ``name`` in ``Site.params``; its per-sample gradient maps back
    to the ``sources`` through the vjp of the parameter-only ops (``passes/find_derived_params``).

    ``isometric``: the ops from its single source keep the norm (views, permutes, adding a
    constant): the site's own norm is the source's, and only the clipped sum goes through the
    vjp. Otherwise the per-sample gradients are instantiated and mapped by ``vmap(vjp)``.
    """

    name: str  # the name sites use: a source's, or "<module>.<node>" (not a parameter name)
    node: str  # its node in the forward graph
    sources: tuple[str, ...]  # the trainable parameters it is computed from
    chain: tuple[str, ...]  # the ops from the sources to it, in graph order
    isometric: bool


@dataclass
class SiteValues:
    """The runtime tensors of one site inside the joint graph.

    ``tensors`` and ``grad`` are float32 at least (what the norms are computed from). Under
    autocast the op computed in a narrower dtype, ``compute_dtype``, and ``computed`` holds its
    floating tensors (``"grad"`` too) in that dtype, the values the float32 copies were made
    from: a rule computes instantiated per-sample gradients in the autocast dtype, as AMP's own
    weight-gradient kernel, by reading them (:meth:`operand`; ``rules/conv.py``), and widens
    the result before its norms and clipped sum (never a clipped sum over the batch from them:
    NOTE [clipped GEMM dtype] in ``rules/linear.py``).
    """

    site: Site
    tensors: dict[str, torch.Tensor]  # role -> activation tensor (e.g. "input")
    grad: torch.Tensor  # dL/ds, same shape as the op's output
    batch: Any  # the batch size (a SymInt while tracing)
    compute_dtype: torch.dtype | None = None  # bf16/fp16 under autocast, else None
    computed: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> [compute_dtype]

    def operand(self, role: str) -> torch.Tensor:
        """The tensor of ``role`` (``"grad"``: the output gradient) as the op computed with it:
        in ``compute_dtype`` under autocast, else the tensor itself."""
        if role in self.computed:
            return self.computed[role]
        return self.grad if role == "grad" else self.tensors[role]


class Length(int):
    """A dim traced with a symbolic size other than the batch (a dynamic sequence length):
    its value is the size the trace was made with (cost models read it), ``expr`` the
    symbol (or expression of symbols)."""

    expr: Any

    def __new__(cls, hint: int, expr):
        out = super().__new__(cls, hint)
        out.expr = expr
        return out

    def __repr__(self) -> str:
        return str(self.expr)


@dataclass(frozen=True)
class InputMeta:
    """Shape/dtype of one tensor input; ``batched`` ones have the symbolic batch as dim 0."""

    shape: tuple[int, ...]  # dim 0 is the example's batch size when batched
    dtype: torch.dtype
    device: torch.device
    batched: bool
    # dims traced with a symbolic size other than the batch (a sequence length): dim -> name of
    # the symbol; inputs' dims with the same name share one symbol
    dynamic: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class SizeGuard:
    """A condition on the symbolic sizes (the batch, dynamic lengths) that the trace assumed
    (e.g. ``s0 < 16`` in a kernel's heuristic, a branch of the model's forward, a length
    pinned by a reshape)."""

    symbols: tuple[tuple[str, Any], ...]  # (name, sympy symbol) of every size in ``expr``
    expr: Any  # sympy boolean

    def holds(self, sizes: dict) -> bool:
        """Evaluate at ``sizes`` (name -> int, or SymInt under torch.compile: then the check
        becomes a guard of the compiled graph)."""
        return evaluate_size_condition(self.expr, {sym: sizes[n] for n, sym in self.symbols})
