"""Flatten nested inputs/outputs into tensors plus a *layout*: a nested tuple of constants.

A layout is hashable and made of Python constants, so torch.compile can pass it as an argument to
a function it keeps in the graph (a pytree ``TreeSpec`` cannot be). Supported nodes: tensors,
tuples, lists, dicts (dict subclasses such as Hugging Face ``ModelOutput`` are rebuilt with their
class) and constants (None, bool, int, float, str).
"""

from __future__ import annotations

import torch

CONSTANT_TYPES = (type(None), bool, int, float, str)


def flatten(obj, leaves: list) -> tuple:
    """Append the tensors of ``obj`` to ``leaves`` and return its layout."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return ("T",)
    if isinstance(obj, CONSTANT_TYPES):
        return ("C", obj)
    if isinstance(obj, (tuple, list)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return (kind, tuple(flatten(x, leaves) for x in obj))
    if isinstance(obj, dict):
        keys = tuple(obj.keys())
        cls = None if type(obj) is dict else type(obj)
        return ("dict", cls, keys, tuple(flatten(obj[k], leaves) for k in keys))
    raise TypeError(
        f"fx_bk: cannot pass a value of type {type(obj).__name__} through the model's "
        f"inputs or outputs; use tensors, tuples, lists, dicts or constants (None, bool, int, "
        f"float, str)"
    )


def unflatten(layout: tuple, leaves, pos: int = 0):
    """Inverse of :func:`flatten`; returns ``(obj, next_pos)``."""
    kind = layout[0]
    if kind == "T":
        return leaves[pos], pos + 1
    if kind == "C":
        return layout[1], pos
    if kind in ("tuple", "list"):
        items = []
        for child in layout[1]:
            item, pos = unflatten(child, leaves, pos)
            items.append(item)
        return (items if kind == "list" else tuple(items)), pos
    cls, keys, children = layout[1], layout[2], layout[3]
    values = {}
    for k, child in zip(keys, children):
        values[k], pos = unflatten(child, leaves, pos)
    return (values if cls is None else cls(**values)), pos
