"""Bundles: which handler computes the sites that share a trainable parameter.

A parameter used at several sites (tied weights, a module called twice) has ONE per-sample
gradient, the sum over its sites; its norm has cross terms between the sites, so the sites are
computed together as a *bundle* by one :class:`~fx_bk.rules.base.BundleHandler`:

1. the sites' rule, when they all have one rule that ``can_merge`` them (a Linear called twice:
   positions concatenated);
2. else a tie handler registered for that combination (``tied.py``: tied input/output
   embeddings);
3. else :class:`InstantiateShared`: every site's per-sample gradients ``[B, *p.shape]`` summed
   (exact; memory ``B * |p|``).

A site whose samples are groups of rows (``site.row_group``: user-level DP's examples folded
into the batch) always goes to :class:`InstantiateShared`, which sums its per-row gradients per
sample first.
"""

from __future__ import annotations

from fx_bk.cost_model import plan_instantiated
from fx_bk.site import Site, SiteValues, Strategy

from .base import TIE_HANDLERS, BundleHandler, PerSampleGrads


class InstantiateShared:
    """Bundle handler of last resort: per-sample gradients of every site, summed."""

    def plan(self, sites: list[Site]) -> None:
        plan_instantiated(sites, Strategy.SHARED)

    def norm_sq(self, values: list[SiteValues]):
        per_sample: dict = {}
        for v in values:
            for name, g in v.site.rule.per_sample_grads(v).items():
                if v.site.row_group > 1:  # per row -> per sample
                    g = g.unflatten(0, (-1, v.site.row_group)).sum(1)
                per_sample[name] = per_sample[name] + g if name in per_sample else g
        state = PerSampleGrads(per_sample)
        return state.norm_sq(), state

    def clipped_grads(self, values, state: PerSampleGrads, c):
        return state.clipped(c)


def bundle_handler(sites: list[Site]) -> BundleHandler:
    """The handler of a bundle (see the module docstring for the order)."""
    rules = {id(s.rule) for s in sites}
    if any(s.row_group > 1 for s in sites):
        return InstantiateShared()
    if len(rules) == 1 and sites[0].rule.can_merge(sites):
        return sites[0].rule
    return next((t for t in TIE_HANDLERS if t.matches(sites)), InstantiateShared())
