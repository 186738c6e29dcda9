"""The rule contract and the rule registry (the per-sample math the rules share is in
``sample_math.py``, re-exported here).

A **rule** computes, for one site (an op on trainable parameters; see ``fx_bk/site.py``), from
the tensors the op saw (activations ``a``) and the gradient of the loss w.r.t. the op's output
(``g = dL/ds``, batch-first), per sample ``i``:

* ``norm_sq(values) -> (norms [B], state)``: ``sum_p ||dl_i/dp||^2`` over the site's trainable
  parameters, computed from ``g`` (before the loss-reduction scaling the caller applies);
  ``state`` is the rule's own typed record of what the clipped sum needs;
* ``clipped_grads(values, state, c) -> {param name: sum_i c_i dl_i/dp}``, ``c: [B]``;
* ``per_sample_grads(value) -> {param name: [B, *p.shape]}``: the per-sample gradients
  themselves. Every rule has them: they are the default ``norm_sq``/``clipped_grads`` and what
  a parameter shared by sites of different rules falls back to.

Small instantiated per-sample gradients (biases, norm weights) go through
``instantiated_norm`` / ``instantiated_sum`` (``pool.py``): the clip stage then reduces all of a
clipping group's together, one norm and one weighted sum, instead of two reductions each.

``values`` holds one :class:`~fx_bk.site.SiteValues`, or several when the rule's
``can_merge(sites)`` says it computes their summed gradient exactly (the same Linear called
twice: its norm then includes the cross terms). Sites that share a parameter form a *bundle*
(one per-sample gradient, one term of the norm); the object that computes a bundle is a
:class:`BundleHandler`: the rule itself, a tie handler for sites of different rules
(``tied.py``), or :class:`~fx_bk.rules.shared.InstantiateShared`.

A site value's ``tensors`` and ``grad`` are float32 at least. Under autocast the value also holds
them in the dtype the op computed in (``value.operand(role)``, ``value.compute_dtype``): a rule's
instantiated per-sample gradients may come from those, as AMP's weight gradient does
(convolutions), when its norms and clipped sum both read the widened result. A clipped sum
over the batch reads the float32 ones (NOTE [clipped GEMM dtype] in ``linear.py``).

Adding an op: one file in ``fx_bk/rules/`` with a :class:`Rule` subclass decorated by
:func:`register_rule` (every module of the package is imported), and one row in
``tests/test_rules.py``. From user code, the same decorator (``fx_bk.register_rule``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from fx_bk._torch_internals import is_op_overload
from fx_bk.cost_model import plan_instantiated
from fx_bk.errors import ConfigError
from fx_bk.site import Site, SiteValues, Strategy

from .pool import instantiated_norm, instantiated_sum
from .sample_math import (  # noqa: F401  (re-exported: the rules import them from here)
    accumulation_dtype,
    keep_samples,
    scale_samples,
    scale_smaller,
    squared_norm,
    sum_pairs,
    weighted_sum,
)

RULES: dict = {}  # op overload -> Rule instance (dedicated rules)
TIE_HANDLERS: list = []  # bundle handlers for sites of different rules (``matches(sites)``)
_FALLBACK: list = []  # the rule for ops without a dedicated one (``generic.py``), at most one


@dataclass
class PerSampleGrads:
    """State of an instantiating rule: the per-sample gradients by parameter name."""

    grads: dict[str, torch.Tensor]  # name -> [B, *p.shape]

    def norm_sq(self) -> torch.Tensor:
        """``sum_p ||G_i,p||^2``: [B]; under the clip stage's pool the pooled terms are 0 here
        and counted by the pool, so add it once, as is, into the bundle's norm (``pool.py``)."""
        return sum(instantiated_norm(g) for g in self.grads.values())

    def clipped(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_i c_i G_i,p`` per parameter."""
        return {name: instantiated_sum(c, g) for name, g in self.grads.items()}


class Rule(abc.ABC):
    """Base class of every rule; a subclass must give ``name`` and ``per_sample_grads``.

    Class attributes: ``param_args`` / ``tensor_args`` name the op's schema arguments that may
    hold a trainable parameter / whose values the rule needs at run time (``roles(op)`` renames
    schema arguments, e.g. ``mat2`` -> ``weight``); ``strategies`` is the rule's line in the
    README's op table; ``folds_batch``: the op treats every dim of its row tensor
    (``row_role``) before the last ``core_dims(site)`` as independent rows, so a batch at any of
    those dims, or folded into them by a row-major reshape (``[B*T, d]``, ``[T, B, d]``, Swin's
    windows ``[B*nW, N, C]``), is read batch-first (``site.batch_layout``: the rule then gets
    ``[B, T, *rest]``); ``rows_independent``: the op computes each row of dim 0 from that row
    alone (a convolution, a norm), so a batch of ``K * B`` rows, K consecutive rows per sample,
    is read as per-row gradients summed per sample (``site.row_group``); ``fallback``: the rule
    handles ops without a dedicated rule.

    The default ``plan`` / ``norm_sq`` / ``clipped_grads`` instantiate ``per_sample_grads``:
    norm ``sum_p ||G_i,p||^2``, clipped sum ``sum_i c_i G_i,p``. Override them for a cheaper
    formula (ghost norms, ``linear.py``).
    """

    name: str = ""
    ops: tuple = ()  # set by register_rule
    param_args: tuple[str, ...] = ()
    tensor_args: tuple[str, ...] = ()
    strategies: str = "instantiated"
    folds_batch: bool = False
    rows_independent: bool = False
    fallback: bool = False

    def roles(self, op) -> dict[str, str]:
        """Schema argument name -> role name used by this rule (default: the same)."""
        return {}

    def takes_param(self, role: str) -> bool:
        """May the argument in ``role`` be a trainable parameter of this site?"""
        return role in self.param_args

    def needs_tensor(self, role: str, is_param: bool) -> bool:
        """Does the rule read the tensor in ``role`` at run time (``is_param``: it holds a
        trainable parameter of the site)?"""
        return role in self.tensor_args and not is_param

    def accepts(self, op) -> bool:
        """Is ``op`` one of this rule's ops (the fallback rule accepts a whole class)?"""
        return op in self.ops

    def applies(self, site: Site) -> bool:
        """False: the use is not a site of this rule (it gets the unsupported-op error)."""
        return True

    def row_role(self, site: Site) -> str:
        """The argument whose leading dims are the op's rows (``folds_batch`` rules)."""
        return "input"

    def core_dims(self, site: Site) -> int:
        """How many trailing dims of the row tensor the op mixes (``folds_batch`` rules)."""
        return 1

    def layout_problem(self, site: Site) -> str | None:
        """Rules read the batch at dim 0 of the op's tensors, and nowhere else."""
        for role in (*site.tensor_args, "out"):
            shape = site.shapes[role]
            if not shape or shape[0] != "B" or any(isinstance(d, str) for d in shape[1:]):
                what = "output" if role == "out" else f"argument '{role}'"
                return (
                    f"its {what} has shape {list(shape)} (B = batch size): the batch must be "
                    f"dim 0 and only there. A parameter applied to a tensor without the batch "
                    f"dim (e.g. a positional embedding of arange(T), broadcast later) has no "
                    f"per-sample gradient at this op: give it the batch dim, e.g. "
                    f"pos(torch.arange(T).expand(B, T)); do not fold the batch into other dims"
                )
        return None

    def validate(self, site: Site) -> str | None:
        """A reason this site cannot be handled (e.g. a sparse embedding), or None."""
        return None

    def can_merge(self, sites: list[Site]) -> bool:
        """Can this rule compute the summed per-sample gradient of these sites exactly?"""
        return len(sites) == 1

    def plan(self, sites: list[Site]) -> None:
        """Set ``site.strategy`` and ``site.cost`` (multiply-adds per sample) from the shapes."""
        plan_instantiated(sites, Strategy.INSTANTIATE)

    @abc.abstractmethod
    def per_sample_grads(self, value: SiteValues) -> dict[str, torch.Tensor]:
        """``{param name: [B, *p.shape]}`` for the site's trainable parameters."""

    def norm_sq(self, values: list[SiteValues]) -> tuple[torch.Tensor, Any]:
        (value,) = values
        state = PerSampleGrads(self.per_sample_grads(value))
        return state.norm_sq(), state

    def clipped_grads(self, values: list[SiteValues], state: Any,
                      c: torch.Tensor) -> dict[str, torch.Tensor]:
        return state.clipped(c)

    def __repr__(self) -> str:
        return f"<fx_bk rule {self.name!r}>"


@runtime_checkable
class BundleHandler(Protocol):
    """Computes one bundle (sites sharing trainable parameters) as one per-sample gradient."""

    def plan(self, sites: list[Site]) -> None: ...

    def norm_sq(self, values: list[SiteValues]) -> tuple[torch.Tensor, Any]: ...

    def clipped_grads(self, values: list[SiteValues], state: Any,
                      c: torch.Tensor) -> dict[str, torch.Tensor]: ...


def register_rule(*ops, replace: bool = False):
    """Class decorator: ``rule_cls()`` computes the sites of ``ops`` (op overloads).

    Example, a rule for a user's custom op ``mylib::scale(x, w) = x * w`` (``w: [d]``)::

        @fx_bk.register_rule(torch.ops.mylib.scale.default)
        class ScaleRule(fx_bk.Rule):
            name = "mylib.scale"
            param_args = ("w",)     # schema arguments that may be trainable parameters
            tensor_args = ("x",)    # schema arguments the rule reads

            def per_sample_grads(self, value):  # value.grad = dL/ds: [B, *, d]
                g_w = (value.grad * value.tensors["x"]).flatten(1, -2).sum(1)  # [B, d]
                return {value.site.params["w"]: g_w}

    ``replace=True`` lets a rule take over ops that already have one. The decorator also
    accepts a rule instance (table-driven families register several instances of one class).
    """
    for op in ops:
        if not is_op_overload(op):
            hint = (" (an op packet: use its overload, e.g. .default)"
                    if hasattr(op, "overloads") else "")
            raise ConfigError(
                f"register_rule takes op overloads such as torch.ops.aten.linear.default or "
                f"torch.ops.mylib.my_op.default, got {op!r}{hint}"
            )
    if not ops:
        raise ConfigError("register_rule needs at least one op overload")

    def deco(rule_or_cls):
        rule = rule_or_cls() if isinstance(rule_or_cls, type) else rule_or_cls
        if not isinstance(rule, Rule):
            raise ConfigError(
                f"register_rule decorates a subclass of fx_bk.Rule, got {rule_or_cls!r}"
            )
        if not rule.name:
            raise ConfigError(f"{type(rule).__name__}: a rule needs a name (class attribute)")
        taken = [op for op in ops if op in RULES and RULES[op] is not rule]
        if taken and not replace:
            raise ConfigError(
                f"{type(rule).__name__}: {', '.join(map(str, taken))} already handled by rule "
                f"{RULES[taken[0]].name!r}; pass replace=True to register_rule to override it"
            )
        rule.ops = tuple(dict.fromkeys((*rule.ops, *ops)))
        for op in ops:
            RULES[op] = rule
        return rule_or_cls

    return deco


def unregister_rule(*ops) -> None:
    """Remove the rules of ``ops`` (their sites get the fallback rule or an error again)."""
    for op in ops:
        rule = RULES.pop(op, None)
        if rule is not None:
            rule.ops = tuple(o for o in rule.ops if o != op)


def set_fallback_rule(rule: Rule) -> Rule:
    """The rule for ops on trainable parameters that have no dedicated rule (one at most)."""
    _FALLBACK[:] = [rule]
    return rule


def fallback_rule() -> Rule | None:
    """The rule for ops without a dedicated one (``generic.py``), if set."""
    return _FALLBACK[0] if _FALLBACK else None


def rule_for(op, *, fallback: bool = True) -> Rule | None:
    """The dedicated rule of ``op``; else the fallback rule when it accepts ``op``."""
    rule = RULES.get(op)
    if rule is None and fallback and _FALLBACK and _FALLBACK[0].accepts(op):
        return _FALLBACK[0]
    return rule


def register_tie_handler(handler) -> None:
    """A bundle handler for sites of different rules that share a parameter; it is used for
    the bundles where ``handler.matches(sites)`` is true."""
    TIE_HANDLERS.append(handler)
