"""Flatten nested inputs/outputs into tensors plus a *layout*: a nested tuple of constants.

A layout is hashable and made of Python constants, so torch.compile can pass it as an argument to
a function it keeps in the graph (a pytree ``TreeSpec`` cannot be). Supported nodes: tensors,
tuples, lists, dicts (dict subclasses such as Hugging Face ``ModelOutput`` are rebuilt with their
class) and constants (None, bool, int, float, str).

In outputs, a generation cache (a Hugging Face ``Cache``, e.g. ``DynamicCache`` from a decoder's
default ``use_cache=True``) is dropped: it is returned as ``None``, with one warning. A cache
is for the next generation step, which training does not take; its key/value tensors are
computed by the forward anyway. Pass ``use_cache=False`` to avoid building it.
"""

from __future__ import annotations

import warnings

import torch

CONSTANT_TYPES = (type(None), bool, int, float, str)


def is_generation_cache(obj) -> bool:
    """A Hugging Face generation cache (``transformers.Cache`` and its subclasses)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(obj).__mro__)


def flatten(obj, leaves: list, *, outputs: bool = False) -> tuple:
    """Append the tensors of ``obj`` to ``leaves`` and return its layout (``outputs``: the
    model's outputs, where a generation cache is dropped)."""
    if outputs and is_generation_cache(obj):
        warnings.warn(
            f"fx_bk returns the model's {type(obj).__name__} output as None: a generation "
            f"cache is not carried through the BK program (training does not use it). Pass "
            f"use_cache=False to the model (or its config) to avoid building it",
            stacklevel=2,
        )
        return ("C", None)
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return ("T",)
    if isinstance(obj, CONSTANT_TYPES):
        return ("C", obj)
    if isinstance(obj, (tuple, list)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return (kind, tuple(flatten(x, leaves, outputs=outputs) for x in obj))
    if isinstance(obj, dict):
        keys = tuple(obj.keys())
        cls = None if type(obj) is dict else type(obj)
        return ("dict", cls, keys, tuple(flatten(obj[k], leaves, outputs=outputs)
                                         for k in keys))
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
