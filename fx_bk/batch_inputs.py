"""Which inputs of a call carry the batch: declared, never guessed from a size coincidence.

A tensor input is batched when its dim 0 equals the batch size (the first batched tensor's),
unless its forward argument is declared ``unbatched`` (``fx_bk.transform(...,
unbatched=["class_weights"])``). A shared tensor whose dim 0 happens to equal the batch size
would otherwise be taken for per-sample data: its rows would be read as samples' own (a
position-dependent weighting proven "sample-wise"), and under Poisson sampling that happens at
random steps. So ``BatchHistory`` remembers, per argument, whether it was batched; an argument
that changes sides between calls is an error asking for the declaration.
"""

from __future__ import annotations

import inspect

import torch

from ._torch_internals import statically_known_true, sym_hint
from .errors import Problem, UnsupportedModelError
from .layout import unflatten
from .site import InputMeta


def leaf_arguments(module: torch.nn.Module, layout, n_leaves: int) -> tuple[str, ...]:
    """The forward argument each tensor leaf of a call belongs to (``"x"``, ``"labels"``...;
    ``"*"`` for leaves of ``*args`` / ``**kwargs`` without a name)."""
    (args, kwargs), _ = unflatten(layout, [_Leaf(i) for i in range(n_leaves)])
    names = ["*"] * n_leaves
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return tuple(names)
    for name, value in bound.items():
        for leaf in _leaves(value):
            names[leaf.i] = name
    return tuple(names)


class _Leaf:
    def __init__(self, i: int):
        self.i = i


def _leaves(obj):
    if isinstance(obj, _Leaf):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _leaves(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _leaves(x)


def input_metas(inputs: list[torch.Tensor], declared: tuple[bool, ...]):
    """The batch size (int, or SymInt under torch.compile) and concrete metadata per input;
    ``declared[i]``: input ``i`` is declared unbatched.

    Under ``torch.compile(dynamic=True)`` every dim may be symbolic: the non-batch dims are
    specialized here (``int()`` adds a guard, so a new sequence length recompiles), the batch
    dim stays symbolic and its hint sizes the trace.
    """
    batch = next((x.shape[0] for x, d in zip(inputs, declared) if x.dim() > 0 and not d), None)
    metas = []
    for x, d in zip(inputs, declared):
        batched = not d and x.dim() > 0 and _same_size(x.shape[0], batch)
        shape = [sym_hint(s) if batched and i == 0 else int(s) for i, s in enumerate(x.shape)]
        metas.append(InputMeta(tuple(shape), x.dtype, x.device, batched))
    return batch, metas


def batch_free_signature(metas: list[InputMeta]) -> tuple:
    """What one traced program assumes of its inputs: every size but the batch, dtypes,
    devices, which are batched (a key of the programs, ``fx_bk/runtime.py`` and
    ``fx_bk/criterion.py``)."""
    return tuple((m.shape[1:] if m.batched else m.shape, m.dtype, m.device, m.batched)
                 for m in metas)


def _same_size(a, b) -> bool:
    """Eager: equal ints. Under torch.compile Dynamo gives each input its own batch symbol
    (``input_ids: [s0, T]``, ``labels: [s1]``): equal hints mean the same batch, and
    ``torch._check`` makes that a guard (a call where they differ recompiles)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        if statically_known_true(a == b):
            return True
        if sym_hint(a) != sym_hint(b):
            return False
        torch._check(a == b)
        return True
    return a == b


class BatchHistory:
    """Whether each (argument, leaf) was batched in earlier calls of one module."""

    def __init__(self):
        self.seen: dict[tuple, tuple[bool, int]] = {}  # (name, k) -> (batched, dim 0 size)

    def check(self, names: tuple[str, ...], metas: list[InputMeta], batch) -> None:
        counts: dict[str, int] = {}
        for name, meta in zip(names, metas):
            k = counts[name] = counts.get(name, -1) + 1
            size = meta.shape[0] if meta.shape else None
            before = self.seen.setdefault((name, k), (meta.batched, size))
            if before[0] == meta.batched or size is None:
                continue
            was = "was" if before[0] else "was not"
            now = "is" if meta.batched else "is not"
            raise UnsupportedModelError([Problem(
                "ambiguous-batch-input",
                f"argument '{name}' (dim 0 = {size}) {now} taken as batched in this call "
                f"(batch size {sym_hint(batch) if batch is not None else '-'}) but {was} in an "
                f"earlier one (dim 0 = {before[1]}): fx_bk cannot tell a per-sample input from "
                f"a shared tensor whose size happens to equal the batch size. If '{name}' is "
                f"shared by all samples, declare it: fx_bk.transform(model, ..., "
                f"unbatched=[{name!r}])",
            )])
