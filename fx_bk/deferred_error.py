"""fx_bk's errors under ``torch.compile``, raised as themselves.

A model fx_bk rejects is found while Dynamo traces the first call, and an exception raised
there reaches the user wrapped in Dynamo's ``TorchRuntimeError``: ``except
fx_bk.UnsupportedModelError`` would miss it. So while tracing, ``defer`` stores the error and
returns the call of an opaque op, ``fx_bk::unsupported_model``, whose fake outputs have the
model's output shapes; the compiled graph runs it first thing, and it raises the stored error,
unwrapped, with its ``.problems``.
"""

from __future__ import annotations

import itertools

import sympy
import torch

from ._torch_internals import sym_expr
from .errors import UnsupportedModelError

_ERRORS: dict[int, tuple] = {}  # key -> (problems, output specs, batch symbol)
_keys = itertools.count()


@torch.library.custom_op("fx_bk::unsupported_model", mutates_args=())
def unsupported_model(batch: torch.Tensor, key: int) -> list[torch.Tensor]:
    raise UnsupportedModelError(_ERRORS[key][0])


@unsupported_model.register_fake
def _unsupported_model_fake(batch: torch.Tensor, key: int) -> list[torch.Tensor]:
    _, specs, symbol = _ERRORS[key]
    size = batch.shape[0]
    return [torch.empty([sympy.lambdify(symbol, s)(size) if s.free_symbols else int(s)
                         for s in shape], dtype=dtype, device=device)
            for shape, dtype, device in specs]


def defer(error: UnsupportedModelError, outputs: list, symbol, batch: torch.Tensor) -> list:
    """The outputs of a rejected call while torch.compile traces it: ``outputs`` are the
    traced forward's output values (fake tensors with the batch ``symbol`` in their sizes),
    ``batch`` a batched input of the call."""
    key = next(_keys)
    specs = [([sym_expr(s) for s in o.shape], o.dtype, o.device) for o in outputs]
    _ERRORS[key] = (error.problems, specs, symbol)
    return torch.ops.fx_bk.unsupported_model(batch, key)


class Rejected:
    """What ``program_for`` returns for a model it rejected while torch.compile traced it."""

    def __init__(self, prog, error: UnsupportedModelError):
        self.prog, self.error = prog, error  # a passes.BKProgram whose trace succeeded

    def outputs(self, inputs: list) -> list:
        prog = self.prog
        values = [n.meta["val"] for n in prog.forward_graph.graph.output_node().args[0]]
        batched = next(x for x, m in zip(inputs, prog.inputs) if m.batched)
        return defer(self.error, values[: prog.num_outputs], prog.mode.batch_symbol, batched)
