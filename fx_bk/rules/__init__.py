"""The per-op rule registry.

A *site* is one op of the forward graph that consumes a trainable parameter. Its rule knows, from
the tensors the op saw (activations ``a``) and the gradient of the loss w.r.t. the op's output
(``g = dL/ds``, shape ``[B, ...]``), how to compute per sample ``i``:

* ``norm_sq(values) -> ([B], state)``: the squared L2 norm of the per-sample gradient of the
  site's trainable parameters, ``sum_p ||dl_i/dp||^2`` (computed from ``g``, i.e. before the
  loss-reduction scaling the caller applies);
* ``clipped_grads(values, state, c) -> {param_name: grad}``: ``sum_i c_i * dl_i/dp`` for every
  trainable parameter of the site, ``c`` of shape ``[B]``;
* ``per_sample_grads(value) -> {param_name: [B, *p.shape]}``: the instantiated per-sample
  gradients, used when a parameter is shared by sites of different rules.

``values`` is a list of :class:`SiteValues`: one element, or several sites sharing parameters
when ``rule.can_merge(sites)`` says the rule computes their summed gradient exactly (e.g. the same
Linear called twice: its norm then includes the cross terms).

Adding an op: one file here with ``@register_rule`` and one row in ``tests/test_rules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from passes.program import Site, per_sample_numel

RULES: dict = {}  # aten OpOverload -> Rule instance


def register_rule(*ops):
    def deco(cls):
        rule = cls()
        rule.ops = ops
        for op in ops:
            RULES[op] = rule
        return cls

    return deco


def rule_for(op):
    return RULES.get(op)


@dataclass
class SiteValues:
    """The runtime tensors of one site inside the joint graph."""

    site: Site
    tensors: dict[str, torch.Tensor]  # role -> activation tensor (e.g. "input")
    grad: torch.Tensor  # dL/ds, same shape as the op's output
    batch: object  # the batch size (a SymInt while tracing)


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """Norms are accumulated in at least float32."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def affine_per_sample_grads(value: SiteValues, x_hat: torch.Tensor, reduce_dims: tuple):
    """Normalization layers: ``w_i = sum g_i * x_hat_i``, ``b_i = sum g_i`` over ``reduce_dims``."""
    g, out = value.grad, {}
    if "weight" in value.site.params:
        w = g * x_hat
        out[value.site.params["weight"]] = w.sum(reduce_dims) if reduce_dims else w
    if "bias" in value.site.params:
        out[value.site.params["bias"]] = g.sum(reduce_dims) if reduce_dims else g
    return out


# Choosing ghost vs instantiation by multiply-adds alone misjudges instantiation: writing,
# reading and reducing the [B, p, d] per-sample gradients and the B small GEMMs cost more than
# they count. Measured on a 2-thread CPU (Linear d = p = 256, B = 32, compiled): instantiating
# at T = 128 takes 2.7x the blocked ghost norm's time for 1.33x its multiply-adds; at T = 1024 it
# is 5x faster for 3.8x fewer. Charging each gradient element this many multiply-adds fits both.
INSTANTIATE_OVERHEAD = 128


def instantiated_cost(positions: int, p: int, d: int) -> int:
    """Time model, in multiply-add equivalents per sample, of instantiating ``G_i`` [p, d]
    from ``positions`` rows (the FLOPs are ``positions * p * d``)."""
    return (positions + INSTANTIATE_OVERHEAD) * p * d


def plan_instantiated(sites: list[Site], label: str) -> None:
    """Per-sample gradients instantiated: cost = their size (multiply-adds per sample)."""
    for s in sites:
        s.strategy = label
        s.cost = sum(per_sample_numel(s.shapes[r]) for r in s.params)


def weighted_sum(c: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i * per_sample[i]``; c: [B], per_sample: [B, *shape] -> [*shape]."""
    return torch.tensordot(c.to(per_sample.dtype), per_sample, dims=1)


def squared_norm(per_sample: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B]."""
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return flat.to(accumulation_dtype(flat)).pow(2).sum(1)


class Rule:
    """Base class. Subclasses set ``param_args`` / ``tensor_args`` (names in the op's schema)."""

    name = "?"
    ops: tuple = ()
    param_args: tuple[str, ...] = ()  # schema argument names that may hold a parameter
    tensor_args: tuple[str, ...] = ()  # schema argument names whose values the rule needs
    strategies = "instantiated"  # one line for the README's supported-op table
    folds_batch = False  # accepts tensors whose dim 0 folds the batch with positions [B*T, ...]

    def roles(self, op) -> dict[str, str]:
        """Schema argument name -> role name used by this rule (default: the same)."""
        return {}

    def validate(self, site: Site) -> str | None:
        """A reason this site cannot be handled (e.g. sparse embedding), or None."""
        return None

    def can_merge(self, sites: list[Site]) -> bool:
        return len(sites) == 1

    def plan(self, sites: list[Site]) -> None:
        """Choose ``site.strategy`` and ``site.cost`` from the static shapes."""
        plan_instantiated(sites, "instantiate")

    def per_sample_grads(self, value: SiteValues) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def norm_sq(self, values: list[SiteValues]):
        (value,) = values
        grads = self.per_sample_grads(value)
        return sum(squared_norm(g) for g in grads.values()), grads

    def clipped_grads(self, values: list[SiteValues], state, c: torch.Tensor):
        return {name: weighted_sum(c, g) for name, g in state.items()}



class InstantiateShared:
    """Group handler for a parameter shared by sites of different rules and no tie handler:
    each site's per-sample gradients ``[B, *p.shape]`` are instantiated and summed (exact; memory
    ``B * |p|``)."""

    label = "instantiate (shared parameter)"

    def plan(self, sites: list[Site]) -> None:
        plan_instantiated(sites, self.label)

    def norm_sq(self, values: list[SiteValues]):
        per_sample: dict[str, torch.Tensor] = {}
        for v in values:
            for name, g in v.site.rule.per_sample_grads(v).items():
                per_sample[name] = per_sample[name] + g if name in per_sample else g
        return sum(squared_norm(g) for g in per_sample.values()), per_sample

    def clipped_grads(self, values, state, c):
        return {name: weighted_sum(c, g) for name, g in state.items()}


TIE_HANDLERS: list = []  # handlers with matches(sites) for sites of different rules


def group_handler(sites: list[Site]):
    """What computes a parameter group's norm and clipped grads: the sites' rule when it can
    merge them, else a tie handler for that combination, else :class:`InstantiateShared`."""
    rules = {s.rule for s in sites}
    if len(rules) == 1 and sites[0].rule.can_merge(sites):
        return sites[0].rule
    return next((t for t in TIE_HANDLERS if t.matches(sites)), InstantiateShared())


def supported_ops_table() -> str:
    """The README's supported-op table, generated from the registry."""
    rows = ["| op family | aten ops | parameters | per-sample norm |", "|---|---|---|---|"]
    for rule in sorted(set(RULES.values()), key=lambda r: r.name):
        ops = ", ".join(f"`{op}`" for op in rule.ops)
        params = ", ".join(rule.param_args)
        rows.append(f"| {rule.name} | {ops} | {params} | {rule.strategies} |")
    from .generic import GENERIC

    rows.append(f"| {GENERIC.name} | any functional aten op with one tensor output, batch at "
                f"dim 0 | any tensor argument | {GENERIC.strategies} |")
    return "\n".join(rows)


# Import the rule families so they register themselves.
from . import (  # noqa: E402,F401
    broadcast,
    conv,
    conv_transpose,
    embedding,
    layer_norm,
    linear,
    norms,
    tied,
)
