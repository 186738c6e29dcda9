"""The fx_bk graph passes, run in this order on one ``BKProgram`` (see README.md here)."""

from __future__ import annotations

from fx_bk.errors import raise_if_any

from .build_joint import build_joint
from .check_sample_independence import check_sample_independence
from .emit_aux_outputs import emit_aux_outputs
from .expand_broadcast_sites import expand_broadcast_sites
from .find_sites import find_sites
from .partition_joint import partition_joint
from .plan_sites import plan_sites
from .program import BKProgram, InputMeta, Site
from .trace_model import trace_model

ANALYSIS_PASSES = (
    trace_model,
    expand_broadcast_sites,
    find_sites,
    plan_sites,
    emit_aux_outputs,
    check_sample_independence,
)
BUILD_PASSES = (build_joint, partition_joint)

__all__ = ["BKProgram", "InputMeta", "Site", "run_passes"]


def run_passes(prog: BKProgram, *, build: bool = True) -> BKProgram:
    """Run the analysis passes, raise every problem found at once, then build the graphs."""
    for p in ANALYSIS_PASSES:
        p(prog)
    raise_if_any(prog.problems)
    if build:
        for p in BUILD_PASSES:
            p(prog)
    return prog
