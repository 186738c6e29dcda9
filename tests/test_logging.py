"""``logging.getLogger("fx_bk")`` at DEBUG: one record per graph pass; ``fx_bk.graphs``: code."""

from __future__ import annotations

import logging

import torch

import fx_bk
from fx_bk.testing.models import MLP, TransformerStyle
from passes import ANALYSIS_PASSES, BUILD_PASSES


def test_each_pass_logs_its_result_in_order(caplog):
    model = MLP()
    with caplog.at_level(logging.DEBUG, logger="fx_bk"):
        fx_bk.transform(model, max_grad_norm=1.0)(torch.randn(4, 12))
    records = [r.getMessage() for r in caplog.records if r.name == "fx_bk"]
    names = [p.__name__ for p in (*ANALYSIS_PASSES, *BUILD_PASSES)]
    assert [m.split(" ")[0] for m in records] == names
    by_pass = dict(zip(names, records))
    assert "traced at batch 4" in by_pass["trace_model"]
    assert "3 sites" in by_pass["find_sites"]
    assert by_pass["plan_sites"].count("[linear]") == 3 and "rank-one" in by_pass["plan_sites"]
    assert "0 problems" in by_pass["prove_sample_independence"]
    assert "backward" in by_pass["partition_joint"]
    assert "modelled backward peak" in by_pass["schedule_backward"]
    assert not any(r.name == "fx_bk.graphs" for r in caplog.records)  # its level is separate


def test_graph_code_is_logged_on_its_own_logger(caplog):
    model = TransformerStyle()
    x = torch.randint(1, 13, (3, 5))
    with caplog.at_level(logging.DEBUG, logger="fx_bk.graphs"):
        fx_bk.transform(model, max_grad_norm=1.0)(x)
    graphs = [r.getMessage() for r in caplog.records if r.name == "fx_bk.graphs"]
    assert [g.split("\n")[0] for g in graphs] == [
        "trace_model: forward_graph", "emit_aux_outputs: forward_graph",
        "build_joint: joint_graph", "partition_joint: fw_graph", "partition_joint: bw_graph",
        "schedule_backward: bw_graph"]
    assert "fx_bk.ghost_norm" in graphs[-1]  # the backward holds the BK norms


def test_nothing_is_logged_at_the_default_level(caplog):
    with caplog.at_level(logging.WARNING):
        fx_bk.transform(MLP(), max_grad_norm=1.0)(torch.randn(2, 12))
    assert not [r for r in caplog.records if r.name.startswith("fx_bk")]
