"""The clip stage's pool of small per-sample gradients: one reduction for all of them.

An instantiated per-sample gradient as small as a bias or a norm's weight costs two tiny
reductions, its squared norm and its clipped sum ``sum_i c_i G_i``. A transformer has dozens;
Inductor compiled them as dozens of nodes (horizontally fused kernels whose C++ code generation
and compilation were most of the clip stage's compile time, different for every layer). Pooled,
the clip stage reduces the concatenation of a clipping group's small gradients once for the
norm and once for the clipped sums.

The contract, for a rule's code (``norm_sq`` / ``clipped_grads`` of a bundle whose handler is the
rule itself, which ``fx_bk.clipping`` runs with the group's pool active):

* :func:`instantiated_norm` is ``squared_norm`` of one per-sample gradient that the rule adds,
  once and as is, into the norm it returns. Under a pool it returns the number 0 and the pool
  counts ``||G_i||^2`` in the group's total instead (:meth:`GradientPool.norm_sq`).
* :func:`instantiated_sum` is ``weighted_sum(c, G)``; given the very tensor the norm saw and the
  group's clip factors (``c`` as the clip stage passed it), it returns that gradient's slice of
  the pooled clipped sum, otherwise it computes the sum alone.

Without an active pool (composite handlers: ties, shared and derived parameters, which combine
their parts' norms themselves) both are the plain functions.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from .sample_math import squared_norm, weighted_sum

POOL_MAX_ELEMENTS = 4096  # per sample; a larger per-sample gradient is reduced alone (the
# concatenation copies what it holds, and a GEMM's output, unlike a reduction's, is not written
# into it in place)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fx_bk_gradient_pool", default=None)


class GradientPool:
    """The small per-sample gradients of one clipping group (same dtype and device)."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []  # [B, *shape] each, in registration order
        self.c: torch.Tensor | None = None  # the group's clip factors, set before the sums
        self._sums: dict[int, torch.Tensor] | None = None  # id(tensor) -> its clipped sum

    def accepts(self, per_sample: torch.Tensor) -> bool:
        if per_sample.dim() < 1 or math.prod(per_sample.shape[1:]) > POOL_MAX_ELEMENTS:
            return False
        first = self.tensors[0] if self.tensors else per_sample
        return per_sample.dtype == first.dtype and per_sample.device == first.device

    def add(self, per_sample: torch.Tensor) -> None:
        if self._sums is not None:
            raise RuntimeError("fx_bk internal: a gradient pooled after its clipped sums")
        self.tensors.append(per_sample)

    def holds(self, per_sample: torch.Tensor) -> bool:
        return any(t is per_sample for t in self.tensors)

    def _flat(self) -> torch.Tensor:
        return torch.cat([t.reshape(t.shape[0], -1) for t in self.tensors], 1)

    def norm_sq(self) -> torch.Tensor | None:
        """``sum_t ||t_i||^2`` over the pooled tensors: [B], or None if there are none."""
        return squared_norm(self._flat()) if self.tensors else None

    def clipped_sum(self, per_sample: torch.Tensor) -> torch.Tensor:
        """``sum_i c_i per_sample[i]``, a slice of one weighted sum over every pooled tensor."""
        if self._sums is None:
            total = weighted_sum(self.c, self._flat())  # [sum of the per-sample sizes]
            self._sums, start = {}, 0
            for t in self.tensors:
                size = math.prod(t.shape[1:])
                self._sums[id(t)] = total[start:start + size].view(t.shape[1:])
                start += size
        return self._sums[id(per_sample)]


@contextlib.contextmanager
def pooling(pool: GradientPool | None):
    """Run a rule's ``norm_sq`` / ``clipped_grads`` with ``pool`` active (None: none)."""
    token = _ACTIVE.set(pool)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def instantiated_norm(per_sample: torch.Tensor):
    """``squared_norm(per_sample)`` ([B]), or 0 when the active pool counts it instead (see the
    module docstring: only for a term the rule adds once, as is, into its returned norm)."""
    pool = _ACTIVE.get()
    if pool is None or not pool.accepts(per_sample):
        return squared_norm(per_sample)
    pool.add(per_sample)
    return 0


def instantiated_sum(c: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``weighted_sum(c, per_sample)``; its slice of the pooled sum when the active pool holds
    ``per_sample`` and ``c`` is the group's clip factors."""
    pool = _ACTIVE.get()
    if pool is None or c is not pool.c or not pool.holds(per_sample):
        return weighted_sum(c, per_sample)
    return pool.clipped_sum(per_sample)
