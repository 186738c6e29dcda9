"""Pass 4: group sites that share a parameter and let each rule pick its strategy.

Sites sharing any trainable parameter (tied weights, a module called twice) form one *group*:
the group's per-sample gradient is the sum over its sites, so its norm needs the cross terms.
A group whose sites all have one rule that ``can_merge`` them is computed by that rule; sites of
different rules by a tie handler for that pair when one exists (embedding + linear: tied input and
output embeddings); any other group by instantiating each site's per-sample gradients
(``[B, *p.shape]``) and summing them (exact, but memory ``B * |p|``).

With clipping groups (per-layer or user-defined ``clipping_style``), each site group must lie in
one clipping group (``prog.group_clip``): its norm is computed as one number.
"""

from __future__ import annotations

from fx_bk.errors import Problem
from fx_bk.rules import group_handler

from .program import BKProgram


def group_sites(prog: BKProgram) -> list[list[int]]:
    parent = list(range(len(prog.sites)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, site in enumerate(prog.sites):
        for name in site.params.values():
            if name in owner:
                parent[find(i)] = find(owner[name])
            else:
                owner[name] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(prog.sites)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def plan_sites(prog: BKProgram) -> None:
    prog.groups = group_sites(prog)
    prog.group_handlers = []
    for group in prog.groups:
        sites = [prog.sites[i] for i in group]
        handler = group_handler(sites)
        handler.plan(sites)
        prog.group_handlers.append(handler)
    prog.group_clip = [clip_group_of(prog, [prog.sites[i] for i in g]) for g in prog.groups]


def clip_group_of(prog: BKProgram, sites) -> int:
    groups = prog.config.clip_groups
    if groups is None:
        return 0
    index = {name: k for k, group in enumerate(groups) for name in group}
    params = sorted({n for s in sites for n in s.params.values()})
    ks = sorted({index[n] for n in params})
    if len(ks) > 1:
        prog.problems.append(Problem(
            "clip-group-split",
            f"parameters {params} are used by one op (site {sites[0].node}, "
            f"{sites[0].op}) whose per-sample norm fx_bk computes as one number, but they are "
            f"in different clipping groups {ks}; put them in the same group",
        ))
    return ks[0]
