"""Shims for torch releases older than the tested one (``TESTED_TORCH``), each gated on the
version so that the tested release traces exactly as without them. Not a support promise:
``pyproject.toml`` pins the tested series; these let the GPU check run on an image whose torch
is older (2.11), where the failures they fix were seen.

* torch < 2.13: ``aten.linear`` without a bias, and ``aten.matmul``, on a 3-D input: their
  C++ composite kernels, run under fake tensors in the joint trace, read the sizes through
  ``aten.size`` as Python ints, which pins the symbolic sizes (fx_bk then reports a specialized
  batch). The forward graph's calls of both are intercepted above the dispatcher (a
  torch-function mode: the composite kernels run before any dispatch mode or decomposition
  table sees the op) and decomposed into a reshape and ``mm``, which keep the sizes symbolic.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ W^T + b`` through a 2-D ``mm`` over ``x``'s leading dims folded by a reshape with
    the (symbolic) sizes read in Python: ``matmul`` and ``linear``'s composite kernels fold
    them through ``aten.size`` too."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    return out.reshape(*lead, weight.shape[0])


def _matmul(x: torch.Tensor, other: torch.Tensor):
    """``x @ other`` for a 2-D ``other`` (the matmul rule's ``x @ W``), folded as in
    :func:`_linear`; other shapes are left to ``matmul``."""
    if other.dim() != 2 or x.dim() < 3:
        return aten.matmul.default(x, other)
    lead = x.shape[:-1]
    return torch.mm(x.reshape(-1, x.shape[-1]), other).reshape(*lead, other.shape[1])


_SHIMS = {aten.linear.default: _linear, aten.matmul.default: _matmul}


class _DecomposeFolds(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _SHIMS.get(func, func)(*args, **(kwargs or {}))


def joint_trace_shims():
    """The context the forward graph runs in inside the joint trace: nothing on the tested
    torch."""
    if _release() >= (2, 13):
        return contextlib.nullcontext()
    return _DecomposeFolds()
