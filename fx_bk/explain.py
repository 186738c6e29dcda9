"""``fx_bk.explain``: which rule and strategy every site uses, and what it costs."""

from __future__ import annotations

import torch

from .runtime import BKModule


def explain(model: torch.nn.Module, *args, **kwargs) -> str:
    """Build the BK program for these example inputs and return a table of its sites.

    ``model`` is a plain module (transformed here with a placeholder ``max_grad_norm``; the
    choice of rules does not depend on it) or one returned by ``fx_bk.transform``. Problems
    that make the model unsupported are raised, as at the first training call.
    """
    from .api import transform

    bk = model if isinstance(model, BKModule) else transform(model, max_grad_norm=1.0)
    with torch.enable_grad():  # the BK program is built for calls that can backpropagate
        bk(*args, **kwargs)
    prog = bk.programs[-1].prog
    rows = [
        "| site | op | module | parameters | shapes (B = batch) | rule | strategy | "
        "cost (MACs/sample) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site in prog.sites:
        params = ", ".join(site.params.values())
        module = next(iter(site.params.values())).rpartition(".")[0] or "<root>"
        shapes = "; ".join(f"{k}: {list(v)}" for k, v in site.shapes.items())
        rows.append(
            f"| {site.node} | {site.op} | {module} | {params} | {shapes} | {site.rule.name} | "
            f"{site.strategy}{f' + {site.bundle_note}' if site.bundle_note else ''} | "
            f"{site.cost:,} |"
        )
    total = sum(s.cost for s in prog.sites)
    rows.append(f"\n{len(prog.sites)} sites, {total:,} multiply-adds per sample for the norms")
    return "\n".join(rows)
