"""Shims for torch releases older than the tested one (``TESTED_TORCH``), each gated on the
version so that the tested release traces exactly as without them. Not a support promise:
``pyproject.toml`` pins the tested series; these let the GPU check run on an image whose torch
is older (2.11), where the failures they fix were seen.

* torch < 2.13: ``aten.linear`` without a bias and ``aten.matmul`` on inputs of more than two
  dims: their C++ composite kernels, run under fake tensors in the joint trace, read the sizes
  through ``aten.size`` as Python ints, which pins the symbolic sizes (fx_bk then reports a
  specialized batch). The joint function's calls (the forward graph's, and the rules' own
  per-sample Grams) are intercepted above the dispatcher (a torch-function mode: the composite
  kernels run before any dispatch mode or decomposition table sees the op) and folded into
  ``mm`` / ``bmm`` by reshapes, which keep the sizes symbolic.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ W^T + b`` through a 2-D ``mm`` over ``x``'s leading dims folded by a reshape with
    the (symbolic) sizes read in Python: ``matmul`` and ``linear``'s composite kernels fold
    them through ``aten.size`` too."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    return out.reshape(*lead, weight.shape[0])


def _matmul(x: torch.Tensor, other: torch.Tensor):
    """``x @ other`` folded as in :func:`_linear`: a 2-D ``other`` (the matmul rule's
    ``x @ W``) by ``mm``, equal batch dims (a rule's per-sample Grams) by ``bmm``; other
    shapes are left to ``matmul``."""
    if other.dim() == 2 and x.dim() >= 3:
        lead = x.shape[:-1]
        return torch.mm(x.reshape(-1, x.shape[-1]), other).reshape(*lead, other.shape[1])
    if x.dim() == other.dim() >= 3 and x.shape[:-2] == other.shape[:-2]:
        lead = x.shape[:-2]
        out = torch.bmm(x.reshape(-1, *x.shape[-2:]), other.reshape(-1, *other.shape[-2:]))
        return out.reshape(*lead, x.shape[-2], other.shape[-1])
    return aten.matmul.default(x, other)


_SHIMS = {aten.linear.default: _linear, aten.matmul.default: _matmul, torch.matmul: _matmul,
          torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul}


class _DecomposeFolds(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _SHIMS.get(func, func)(*args, **(kwargs or {}))


def joint_trace_shims():
    """The context the joint function (forward graph and rules) is traced in: nothing on the
    tested torch."""
    if torch.__version__ >= (2, 13):  # TorchVersion compares with tuples
        return contextlib.nullcontext()
    return _DecomposeFolds()
