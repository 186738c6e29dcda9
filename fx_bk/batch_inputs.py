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

from ._torch_internals import marked_dynamic_dims, statically_known_true, sym_expr, sym_hint
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


def input_metas(inputs: list[torch.Tensor], declared: tuple[bool, ...], dynamic=frozenset(),
                static: bool = False):
    """The batch size (int, or SymInt under torch.compile), concrete metadata per input and
    the symbolic sizes by name (``{"batch": B, "L0": T, ...}``); ``declared[i]``: input ``i``
    is declared unbatched; ``dynamic``: ``(input, dim)`` pairs to trace with a symbolic size.

    A dim other than the batch is dynamic (traced as a symbol, NOTE [dynamic lengths] in
    ``fx_bk/runtime.py``) when it is in ``dynamic``, marked with Dynamo's ``mark_dynamic``,
    or symbolic under ``torch.compile``. Dynamic dims of the same size in this call share a
    symbol (their name): a later call where they differ gets a trace of its own. Every other
    dim, and with ``static`` every dim but the batch, is specialized (under torch.compile
    ``int()`` adds a guard, so a new size recompiles).
    """
    batch = next((x.shape[0] for x, d in zip(inputs, declared) if x.dim() > 0 and not d), None)
    metas, sizes, names = [], {}, {}
    if batch is not None:
        sizes["batch"] = batch
    for i, (x, d) in enumerate(zip(inputs, declared)):
        batched = not d and x.dim() > 0 and _same_size(x.shape[0], batch)
        marked = marked_dynamic_dims(x)
        shape, dyn = [], []
        for k, s in enumerate(x.shape):
            if batched and k == 0:
                shape.append(sym_hint(s))
                continue
            symbolic = isinstance(s, torch.SymInt) and not _is_batch(s, batch)
            if not static and (symbolic or (i, k) in dynamic or k in marked):
                key = str(sym_expr(s)) if isinstance(s, torch.SymInt) else int(s)
                name = names.setdefault(key, f"L{len(names)}")
                sizes[name] = s
                dyn.append((k, name))
                shape.append(sym_hint(s))
            else:
                shape.append(int(s))
        metas.append(InputMeta(tuple(shape), x.dtype, x.device, batched, tuple(dyn)))
    return batch, metas, sizes


def batch_free_signature(metas: list[InputMeta]) -> tuple:
    """What one traced program assumes of its inputs: every size but the batch and the
    dynamic dims (those by their symbol's name), dtypes, devices, which are batched (a key of
    the programs, ``fx_bk/runtime.py`` and ``fx_bk/criterion.py``)."""
    out = []
    for m in metas:
        shape = list(m.shape)
        for k, name in m.dynamic:
            shape[k] = name
        out.append((tuple(shape[1:]) if m.batched else tuple(shape), m.dtype, m.device,
                    m.batched))
    return tuple(out)


class DynamicDims:
    """Which input dims one module (or criterion) traces symbolically, per call structure
    (NOTE [dynamic lengths] in ``fx_bk/runtime.py``). ``automatic``: a dim whose size differs
    from the previous call's is symbolic from then on."""

    def __init__(self, automatic: bool = True):
        self.automatic = automatic
        self.learned: dict = {}  # call structure -> (input, dim) pairs learned dynamic
        self.last: dict = {}  # call structure -> the previous call's metadata
        self.static: set = set()  # call structures whose symbolic trace failed

    def metas(self, base, inputs, declared, requested=frozenset()):
        """``input_metas`` for a call of structure ``base``; ``requested``: (input, dim)
        pairs declared dynamic by the user."""
        if base in self.static:
            return input_metas(inputs, declared, static=True)
        dynamic = self.learned.get(base, frozenset()) | requested
        batch, metas, sizes = input_metas(inputs, declared, dynamic)
        before, self.last[base] = self.last.get(base), metas
        grown = changed_dims(before, metas) if self.automatic and before else set()
        if not grown:
            return batch, metas, sizes
        self.learned[base] = self.learned.get(base, frozenset()) | grown
        return self.metas(base, inputs, declared, requested)

    def give_up(self, base) -> None:
        """Trace every size of ``base`` on its own from now on (its symbolic trace failed)."""
        self.static.add(base)


def changed_dims(before: list[InputMeta], now: list[InputMeta]) -> set[tuple[int, int]]:
    """The ``(input, dim)`` pairs, batch and dynamic dims excluded, whose size differs between
    two calls of the same input structure (empty when the structure differs)."""
    if len(before) != len(now):
        return set()
    out = set()
    for i, (a, b) in enumerate(zip(before, now)):
        if (len(a.shape), a.dtype, a.device, a.batched) != (len(b.shape), b.dtype, b.device,
                                                             b.batched):
            return set()
        dynamic = {k for k, _ in b.dynamic}
        out |= {(i, k) for k, (x, y) in enumerate(zip(a.shape, b.shape))
                if x != y and not (a.batched and k == 0) and k not in dynamic}
    return out


def _is_batch(size, batch) -> bool:
    return batch is not None and isinstance(batch, torch.SymInt) and \
        statically_known_true(size == batch)


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


class SizeRegions:
    """The programs of one input signature, told apart by the size conditions their traces
    assumed (usually none: one program for every batch size and dynamic length)."""

    def __init__(self):
        self.guards: list = []  # every SizeGuard seen in this signature's traces
        self.programs: dict = {}  # guard outcomes -> program

    def _outcomes(self, sizes: dict) -> tuple[bool, ...]:
        return tuple(g.holds(sizes) for g in self.guards)

    def lookup(self, sizes: dict):
        outcomes = self._outcomes(sizes)
        for key, compiled in self.programs.items():
            if all(o == k for o, k in zip(outcomes, key)):
                return compiled
        return None

    def add(self, program, size_guards: list, trace_sizes: dict) -> None:
        """Add ``program`` (a ``runtime.CompiledProgram``, a checked criterion's graph) under
        the outcomes of the guards at its own trace's sizes."""
        self.guards.extend(size_guards)
        self.programs[self._outcomes(trace_sizes)] = program
