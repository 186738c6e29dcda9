"""A module changed after ``torch.compile`` traced it: a clear error, not a stale program.

In eager mode ``BKModule.program_for`` keys its programs on ``module_signature`` at every call
(NOTE [stale traces] in ``fx_bk/runtime.py``). A compiled graph runs without that Python:
Dynamo's guards recompile on a replaced submodule or parameter, but not on a plain attribute
the wrapped forward reads (``self.scale = 2.0``) or a hook added later. So the compiled graph
calls ``fx_bk::check_unchanged`` (an opaque op, kept as a side effect) first: it compares the
module's signature with the one recorded when the graph was traced and raises on a change.
Cost: one ``module_signature`` per compiled call (about 40 us for a 10-module MLP, 190 us for
a 34-module GPT-2 on the CPU machine).
"""

from __future__ import annotations

import itertools
import weakref

import torch

from ._torch_internals import keep_in_forward
from .errors import FxBkError
from .module_state import module_signature

_TRACED: dict[int, tuple] = {}  # key -> (weakref to the module, its signature when traced)
_keys = itertools.count()


def record(module: torch.nn.Module) -> int:
    """Remember ``module``'s signature now (a compiled graph is being traced); its key."""
    key = next(_keys)
    _TRACED[key] = (weakref.ref(module), module_signature(module))
    return key


@torch.library.custom_op("fx_bk::check_unchanged", mutates_args=())
def check_unchanged(x: torch.Tensor, key: int) -> torch.Tensor:
    ref, traced = _TRACED.get(key, (lambda: None, None))
    module = ref()
    if module is not None and module_signature(module) != traced:
        raise FxBkError(
            f"fx_bk: {type(module).__name__} changed after torch.compile traced it (a plain "
            f"attribute its forward reads, a hook, or a submodule's state that Dynamo does "
            f"not guard); the compiled BK program would be stale. Call "
            f"torch.compiler.reset() after changing the module, or compile it again"
        )
    return x.new_zeros(())


@check_unchanged.register_fake
def _check_unchanged_fake(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty(())


keep_in_forward(torch.ops.fx_bk.check_unchanged.default)
