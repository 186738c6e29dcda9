"""A loss function fx_bk proves: the loss computed outside the module, made visible.

``fx_bk.transform`` proves the model's forward, but a loss computed from its outputs outside
the module is invisible to it: a ``sum`` declared as ``"mean"``, or a loss that couples samples,
would give wrong norms silently. ``checked_criterion(criterion)`` returns a callable that
traces ``criterion`` at its first call per input signature (symbolic batch, like the model),
proves with the same pass that its value is the ``loss_reduction`` of per-sample terms
(``passes/prove_sample_independence.py``; a mean over labelled tokens gets the per-call check
of equal label counts), and from then on runs the traced graph. What it returns is the loss to
call ``backward()`` on.
"""

from __future__ import annotations

import torch

from passes import CRITERION_PASSES, BKProgram, run_passes
from passes.batch_locations import Loss

from ._torch_internals import escape_outer_tracing, is_fake
from .batch_inputs import DynamicDims, SizeRegions, batch_free_signature
from .config import BKConfig
from .errors import Problem, UnsupportedModelError
from .layout import flatten, unflatten


class _Criterion(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class CheckedCriterion:
    """``criterion``, proven to be the ``loss_reduction`` of per-sample losses."""

    def __init__(self, criterion, loss_reduction: str = "mean"):
        self.criterion = criterion
        self.config = BKConfig(max_grad_norm=1.0, loss_reduction=loss_reduction)
        self._graphs: dict = {}  # signature -> SizeRegions of (graph, output layout)
        self._dynamic = DynamicDims()  # a sequence length varies: one proof (as the model's)

    def __call__(self, *args, **kwargs):
        leaves: list = []
        layout = flatten((args, kwargs), leaves)
        if not torch.is_grad_enabled():
            return self.criterion(*args, **kwargs)
        _, metas, sizes = self._dynamic.metas(layout, leaves, (False,) * len(leaves))
        region = self._graphs.setdefault((layout, batch_free_signature(metas)), SizeRegions())
        found = region.lookup(sizes)
        if found is None:
            try:
                prog = self._prove(layout, metas, leaves)
            except Exception:
                if not any(m.dynamic for m in metas):
                    raise
                self._dynamic.give_up(layout)  # proven per length instead
                return self(*args, **kwargs)
            found = (prog.forward_graph, prog.output_layout)
            region.add(found, prog.size_guards, prog.trace_sizes)
        graph, out_layout = found
        return unflatten(out_layout, graph(*leaves))[0]

    def _prove(self, layout, metas, leaves):
        real = not any(is_fake(x) for x in leaves)
        with escape_outer_tracing():
            prog = BKProgram(
                model=_Criterion(self.criterion), config=self.config, param_names=[],
                trainable=[], buffer_names=[], input_layout=layout, inputs=metas,
                example_inputs=[x.detach() for x in leaves] if real else None,
            )
            run_passes(prog, build=False, passes=CRITERION_PASSES)
            outputs = list(prog.forward_graph.graph.output_node().args[0])
            if not any(isinstance(prog.batch_locations.get(o), Loss) for o in outputs):
                raise UnsupportedModelError([Problem(
                    "criterion-not-reduced",
                    f"{self.criterion!r} returns no loss reduced over the batch: a checked "
                    f"criterion must return the {self.config.loss_reduction} of per-sample "
                    f"losses (a per-sample vector reduced afterwards is not seen)",
                )])
        return prog


def checked_criterion(criterion, loss_reduction: str = "mean") -> CheckedCriterion:
    """``criterion`` (``nn.CrossEntropyLoss()``, ``F.cross_entropy``, any function of tensors
    returning a scalar loss), proven at its first call per input signature to be the
    ``loss_reduction`` ("mean" or "sum") of per-sample losses; pass the same
    ``loss_reduction`` as to ``fx_bk.transform``.

        criterion = fx_bk.checked_criterion(nn.CrossEntropyLoss())
        criterion(model(x), y).backward()
    """
    return CheckedCriterion(criterion, loss_reduction)
