"""The fx_bk graph passes, run in this order on one ``BKProgram`` (see ``docs/passes.md``).

At ``logging.DEBUG`` the ``fx_bk`` logger gets one line per pass (what it found or built, and
its time); the ``fx_bk.graphs`` logger, set to DEBUG on its own (it starts at INFO), gets the
code of every graph a pass produced.
"""

from __future__ import annotations

import logging
import sys
import time

from fx_bk.errors import raise_if_any

from .build_joint import build_joint
from .emit_aux_outputs import emit_aux_outputs
from .expand_broadcast_sites import expand_broadcast_sites
from .find_derived_params import find_derived_params
from .find_sites import find_sites
from .partition_joint import partition_joint
from .plan_sites import plan_sites
from .program import BKProgram, Bundle
from .prove_sample_independence import prove_sample_independence
from .schedule_backward import schedule_backward
from .trace_model import trace_model

ANALYSIS_PASSES = (
    trace_model,
    expand_broadcast_sites,
    prove_sample_independence,
    find_derived_params,
    find_sites,
    plan_sites,
    emit_aux_outputs,
)
BUILD_PASSES = (build_joint, partition_joint, schedule_backward)
CRITERION_PASSES = (trace_model, prove_sample_independence)  # a loss function alone

__all__ = ["ANALYSIS_PASSES", "BUILD_PASSES", "CRITERION_PASSES", "BKProgram", "Bundle",
           "run_passes"]

log = logging.getLogger("fx_bk")
graph_log = logging.getLogger("fx_bk.graphs")
if graph_log.level == logging.NOTSET:  # graph code is long: opt in separately from "fx_bk"
    graph_log.setLevel(logging.INFO)


def run_passes(prog: BKProgram, *, build: bool = True, passes=ANALYSIS_PASSES) -> BKProgram:
    """Run the analysis ``passes``, raise every problem found at once, then build the graphs."""
    for p in passes:
        _run_logged(p, prog)
    raise_if_any(prog.problems)
    if build:
        for p in BUILD_PASSES:
            _run_logged(p, prog)
    return prog


def _run_logged(p, prog: BKProgram) -> None:
    """Run pass ``p``; at DEBUG log its module's ``summarize(prog)`` and ``LOGGED_GRAPHS``."""
    start = time.perf_counter()
    p(prog)
    module = sys.modules[p.__module__]
    if log.isEnabledFor(logging.DEBUG):
        ms = 1e3 * (time.perf_counter() - start)
        log.debug("%s (%.0f ms): %s", p.__name__, ms, module.summarize(prog))
    if graph_log.isEnabledFor(logging.DEBUG):
        for name in getattr(module, "LOGGED_GRAPHS", ()):
            graph_log.debug("%s: %s\n%s", p.__name__, name, getattr(prog, name).code)
