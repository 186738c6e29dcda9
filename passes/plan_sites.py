"""Pass 6: bundle the sites that share a parameter and let each handler pick its strategy.

Sites sharing any trainable parameter (tied weights, a module called twice) form one *bundle*:
its per-sample gradient is the sum over its sites, so its norm needs the cross terms. Which
handler computes a bundle (the sites' rule, a tie handler, or instantiation of every site's
per-sample gradients) is ``fx_bk.rules.bundle_handler``'s choice.

With clipping groups (per-layer or user-defined ``clipping_style``), each bundle must lie in
one clipping group (``bundle.clip_group``): its norm is computed as one number.
"""

from __future__ import annotations

from fx_bk.errors import Problem
from fx_bk.rules import bundle_handler
from fx_bk.rules.derived import DerivedBundle
from fx_bk.rules.generic import MAX_PER_SAMPLE_NUMEL
from fx_bk.site import per_sample_numel

from .describe import module_of
from .find_derived_params import derivation_for
from .program import BKProgram, Bundle


def bundle_sites(prog: BKProgram, sites=None, names=None) -> list[list[int]]:
    """Site indices, partitioned by shared trainable parameters (union-find): the sources of
    the derived values the sites name, or (``names=lambda name: (name,)``) the names alone."""
    sites = prog.sites if sites is None else sites
    names = names or prog.sources_of
    parent = list(range(len(sites)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, site in enumerate(sites):
        for name in (n for p in site.params.values() for n in names(p)):
            if name in owner:
                parent[find(i)] = find(owner[name])
            else:
                owner[name] = i
    bundles: dict[int, list[int]] = {}
    for i in range(len(sites)):
        bundles.setdefault(find(i), []).append(i)
    return list(bundles.values())


def plan_sites(prog: BKProgram) -> None:
    prog.bundles = []
    for indices in bundle_sites(prog):
        sites = [prog.sites[i] for i in indices]
        handler = _derived_handler(prog, sites) or bundle_handler(sites)
        handler.plan(sites)
        prog.bundles.append(Bundle(indices, handler, clip_group_of(prog, sites)))


def _derived_handler(prog: BKProgram, sites) -> DerivedBundle | None:
    """The handler of a bundle with sites on derived values (``fx_bk/rules/derived.py``)."""
    by_name = {d.name: d for d in prog.derived.values() if d.name not in d.sources}
    names = list(dict.fromkeys(n for s in sites for n in s.params.values()))
    values = [by_name[n] for n in names if n in by_name]
    if not values:
        return None
    groups = tuple((tuple(g), bundle_handler([sites[i] for i in g]))
                   for g in bundle_sites(prog, sites, names=lambda n: (n,)))
    reached = [src for n in names for src in prog.sources_of(n)]
    isometric = (all(v.isometric for v in values) and len(reached) == len(set(reached)))
    if not isometric:
        numel = sum(per_sample_numel(s.shapes[r]) for s in sites for r in s.params)
        numel += sum(prog.trainable_shape(n).numel() for n in set(reached))
        if numel > MAX_PER_SAMPLE_NUMEL:
            v = values[0]
            prog.problems.append(Problem("unsupported-op", (
                f"trainable parameter(s) {sorted(set(reached))} of module "
                f"'{module_of(v.sources[0])}' reach the batch through "
                f"{' -> '.join(v.chain)}, which is not an isometry of one parameter: fx_bk "
                f"would instantiate {numel:,} gradient elements per sample (limit "
                f"{MAX_PER_SAMPLE_NUMEL:,}). Apply the parameter to the batch directly (e.g. "
                f"F.linear(x, w) rather than x @ w.t() next to another use of w)")))
    return DerivedBundle(derivation_for(prog, values), groups, isometric)


def clip_group_of(prog: BKProgram, sites) -> int:
    groups = prog.config.clip_groups
    if groups is None:
        return 0
    index = {name: k for k, group in enumerate(groups) for name in group}
    params = sorted({n for s in sites for p in s.params.values() for n in prog.sources_of(p)})
    outside = [n for n in params if n not in index]
    if outside:  # trainable now, frozen when transform() resolved the clipping groups
        prog.problems.append(Problem(
            "clip-group-missing",
            f"parameters {outside} are trainable but in no clipping group: they were frozen "
            f"when fx_bk.transform resolved clipping_style (and the noise scale was set from "
            f"its groups). Call fx_bk.transform (or make_private) again after unfreezing",
        ))
        return 0
    ks = sorted({index[n] for n in params})
    if len(ks) > 1:
        prog.problems.append(Problem(
            "clip-group-split",
            f"parameters {params} are used by one op (site {sites[0].node}, "
            f"{sites[0].op}) whose per-sample norm fx_bk computes as one number, but they are "
            f"in different clipping groups {ks}; put them in the same group",
        ))
    return ks[0]


def summarize(prog: BKProgram) -> str:
    lines = [f"{len(prog.bundles)} bundles of {len(prog.sites)} sites:"]
    for s in prog.sites:
        note = f" + {s.bundle_note}" if s.bundle_note else ""
        lines.append(f"  {s.node}: {s.op} [{s.rule.name}] {sorted(s.params.values())} "
                     f"{s.strategy}{note}, cost {s.cost:,}")
    return "\n".join(lines)
