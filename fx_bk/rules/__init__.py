"""The per-op rules: one module per op family, each registering itself (see ``base.py``).

Every module of this package is imported here, so a new family is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    RULES,
    BundleHandler,
    PerSampleGrads,
    Rule,
    accumulation_dtype,
    fallback_rule,
    keep_samples,
    register_rule,
    register_tie_handler,
    rule_for,
    scale_samples,
    scale_smaller,
    set_fallback_rule,
    squared_norm,
    unregister_rule,
    weighted_sum,
)
from .pool import instantiated_norm, instantiated_sum
from .shared import InstantiateShared, bundle_handler

__all__ = [
    "RULES",
    "BundleHandler",
    "InstantiateShared",
    "PerSampleGrads",
    "Rule",
    "accumulation_dtype",
    "bundle_handler",
    "fallback_rule",
    "instantiated_norm",
    "instantiated_sum",
    "keep_samples",
    "register_rule",
    "register_tie_handler",
    "rule_for",
    "scale_samples",
    "scale_smaller",
    "set_fallback_rule",
    "squared_norm",
    "supported_ops_table",
    "unregister_rule",
    "weighted_sum",
]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")


def supported_ops_table(*, builtin_only: bool = True) -> str:
    """The README's supported-op table, generated from the registry (``builtin_only``: the
    rules fx_bk ships, not those registered by user code)."""
    rows = ["| op family | aten ops | parameters | per-sample norm |", "|---|---|---|---|"]
    rules = {id(r): r for r in RULES.values()
             if not builtin_only or type(r).__module__.startswith(__name__)}
    for rule in sorted(rules.values(), key=lambda r: r.name):
        ops = ", ".join(f"`{op}`" for op in rule.ops)
        params = ", ".join(rule.param_args)
        rows.append(f"| {rule.name} | {ops} | {params} | {rule.strategies} |")
    fb = fallback_rule()
    if fb is not None:
        rows.append(f"| {fb.name} | any functional aten op with one tensor output, batch at "
                    f"dim 0 | any tensor argument | {fb.strategies} |")
    return "\n".join(rows)
