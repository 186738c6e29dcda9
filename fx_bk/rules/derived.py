"""Sites on values computed from trainable parameters alone (``fx_bk.site.DerivedValue``).

A site on ``D = f(w)`` (``1 + w``, ``w.reshape(1, -1, 1, 1)``, a standardized conv weight, a bias
table gathered by constant indices) gives, by its own rule, the per-sample gradients
``G_i^D``. The parameters' per-sample gradients are the vjp of ``f``:
``G_i^w = vjp_f(G_i^D)``, and since the vjp is linear the clipped sum is one vjp of the
site's clipped sum: ``sum_i c_i G_i^w = vjp_f(sum_i c_i G_i^D)``.

* isometric ``f`` (views, permutes, adding a constant: ``||vjp_f(G)|| = ||G||``) from one
  parameter to one value: the norm is the site rule's own (ghost norms included);
* any other ``f``: ``G_i^D`` instantiated, ``vmap(vjp_f)`` gives ``G_i^w`` ``[B, *w.shape]``,
  then norm and clipped sum as for any instantiated gradient.

``f`` is the forward graph's parameter-only subgraph (``passes/find_derived_params``), re-run
in the backward (deterministic ops only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fx_bk.cost_model import plan_instantiated
from fx_bk.site import DerivedValue, Site, SiteValues, Strategy

from .base import BundleHandler, PerSampleGrads


@dataclass(frozen=True)
class Derivation:
    """``f``: the parameter-only ops from the forward graph's inputs to some derived values."""

    graph: torch.nn.Module  # (*inputs) -> tuple of the values
    values: tuple[DerivedValue, ...]  # its outputs, in order
    inputs: tuple[int, ...]  # the forward graph's placeholder index of each input
    sources: tuple[str | None, ...]  # per input: trainable parameter name, or None (constant)


@dataclass(frozen=True)
class DerivedBundle:
    """Bundle handler for sites on derived values (and the parameters they come from).

    ``groups``: the bundle's sites (indices into the bundle) split by the names they use, each
    with its own handler; ``isometric``: every derived value is an isometric function of one
    parameter that no other name of the bundle reaches, so the norm is the groups' norms.
    ``bound``: the derivation's input tensors, set inside the joint (:meth:`bind`).
    """

    derivation: Derivation
    groups: tuple[tuple[tuple[int, ...], BundleHandler], ...]
    isometric: bool
    bound: tuple | None = None

    def bind(self, inputs: list) -> DerivedBundle:
        return replace(self, bound=tuple(inputs))

    def plan(self, sites: list[Site]) -> None:
        chains = "; ".join(f"{d.name} = {' -> '.join(d.chain)}" for d in self.derivation.values)
        if self.isometric:
            for idx, handler in self.groups:
                handler.plan([sites[i] for i in idx])
            note = f"vjp of {chains} (isometric)"
        else:
            plan_instantiated(sites, Strategy.DERIVED)
            note = f"vmap(vjp) of {chains}"
        for s in sites:
            s.bundle_note = f"{s.bundle_note} + {note}" if s.bundle_note else note

    def norm_sq(self, values: list[SiteValues]):
        if self.isometric:
            total, states = 0, []
            for idx, handler in self.groups:
                n, state = handler.norm_sq([values[i] for i in idx])
                total, states = total + n, [*states, state]
            return total, states
        per_sample: dict[str, torch.Tensor] = {}
        for v in values:
            for name, g in v.site.rule.per_sample_grads(v).items():
                per_sample[name] = per_sample[name] + g if name in per_sample else g
        state = PerSampleGrads(self._to_sources(per_sample, batched=True))
        return state.norm_sq(), state

    def clipped_grads(self, values: list[SiteValues], state, c: torch.Tensor):
        if not self.isometric:
            return state.clipped(c)
        grads: dict[str, torch.Tensor] = {}
        for (idx, handler), st in zip(self.groups, state):
            _add(grads, handler.clipped_grads([values[i] for i in idx], st, c))
        return self._to_sources(grads, batched=False)

    def _to_sources(self, grads: dict[str, torch.Tensor], *, batched: bool):
        """Replace the derived values' gradients in ``grads`` by their sources' (vjp)."""
        d = self.derivation
        inputs = [t.detach() for t in self.bound]
        slots = [k for k, s in enumerate(d.sources) if s is not None]

        def f(*params):
            args = list(inputs)
            for k, p in zip(slots, params):
                args[k] = p
            return tuple(d.graph(*args))

        params = [inputs[k] for k in slots]
        if batched:  # vjp of the batched forward: the backward of plain (batched) ops
            b = next(iter(grads.values())).shape[0]
            stacked = [p.expand(b, *p.shape) for p in params]
            outs, vjp = torch.func.vjp(torch.func.vmap(f), *stacked)
        else:
            outs, vjp = torch.func.vjp(f, *params)
        cotangents = tuple(grads.pop(v.name).to(o.dtype) for v, o in zip(d.values, outs))
        back = vjp(cotangents)
        out = dict(grads)
        for k, g in zip(slots, back):
            _add(out, {d.sources[k]: g})
        return out


def _add(into: dict, grads: dict) -> None:
    for name, g in grads.items():
        into[name] = into[name] + g.to(into[name].dtype) if name in into else g
