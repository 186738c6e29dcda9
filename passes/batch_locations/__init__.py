"""Where the batch lives in each value of the forward graph, op family by op family.

The lattice of ``prove_sample_independence``: every value of the traced forward graph is

* ``Shared`` -- no sample's data reaches it (parameters, buffers, constants, sizes); ``batchy``
  when its values may depend on the batch size or on a sample's position in the batch
  (``arange(B)``, ``x.shape[0]`` used as a number);
* ``Sample(dim, fold, iota, outer)`` -- sample ``j``'s values along ``dim`` depend on sample
  ``j`` alone; the dim's size is ``outer * B * fold``, the batch between the two (``[B*T, d]``
  has ``fold = T``; ``[T*B, d]``, from a ``[T, B, d]`` transpose, has ``outer = T``); ``iota``
  marks an index made from ``arange(B)`` (no sample data, only positions);
* ``Loss(reduction, guards)`` -- a number that is the ``"mean"`` or ``"sum"`` over the batch of
  per-sample terms; ``guards``: the loss ops among its terms that average over the labels that
  are not ``ignore_index`` (per-sample only when every sample has as many: checked per call);
* ``Mixed(origin, why)`` -- values of several samples meet; ``origin`` is the op that mixed them.

``transfer(node, locs)`` returns the location of a node's value (a list for ops returning
several tensors) from its inputs' locations, or ``PROBE`` for ops this table does not know; the
pass then proves the op on a probe (``prove_sample_independence._probe``). Sizes are the trace's
symbolic sizes, so a rule holds for every batch size.
"""

from __future__ import annotations

from .lattice import PROBE, SHARED, Context, Loss, Mixed, Sample, Shared
from .table import RULES, transfer

__all__ = ["PROBE", "RULES", "SHARED", "Context", "Loss", "Mixed", "Sample", "Shared", "transfer"]
