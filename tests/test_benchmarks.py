"""``benchmarks.step`` in a tiny configuration: structure of its JSON, table and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import step

pytest.importorskip("opacus")


def _finite_pos(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_step_benchmark_tiny_run(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    threads = torch.get_num_threads()
    try:
        res = step.main(["--quick", "--models", "mlp", "--batch", "4", "--rounds", "1",
                         "--steps-per-round", "1", "--warmup", "0", "--no-memory",
                         "--json", str(out_json), "--plot", str(out_png)])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out

    data = json.loads(out_json.read_text())
    assert set(data) >= {"machine", "config", "models", "wall_s"}
    assert {"cpu", "cpu_count", "threads", "torch", "date"} <= set(data["machine"])
    assert list(data["models"]) == ["mlp"]
    m = data["models"]["mlp"]
    assert m["size"]["B"] == 4 and m["params"] > 0
    assert list(m["variants"]) == list(step.VARIANTS)
    for name, r in m["variants"].items():
        assert r["error"] is None, (name, r["error"])  # Opacus supports the MLP
        assert r["n_steps"] == 1
        for k in ("median_ms", "p25_ms", "p75_ms", "ratio", "ratio_p25", "ratio_p75",
                  "first_step_s"):
            assert _finite_pos(r[k]), (name, k, r[k])
    assert m["variants"][step.BASELINE]["ratio"] == 1.0
    for name in ("fx_bk compiled", "Opacus hooks", "Opacus ghost"):  # same clipped sum
        assert m["variants"][name]["grad_check_rel_diff"] < 1e-4, name
    floor = m["floor"]
    assert floor["base_flops"] > 0 and floor["extra_flops"] > 0
    assert math.isfinite(floor["floor"]) and floor["floor"] >= 1.0

    for name in step.VARIANTS:
        assert f"| mlp | {name} |" in text, name
    assert "arithmetic floor" in text and f"= {floor['floor']:.3f}" in text
    if res.get("plot"):  # matplotlib installed
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_subprocess_reports_peak_rss():
    args = step.parse_args(["--quick", "--models", "mlp", "--batch", "4", "--memory-steps", "1"])
    mem = step.measure_memory(args, "mlp", "non-private eager", timeout=120)
    assert "error" not in mem, mem
    assert mem["peak_rss_mb"] >= mem["rss_before_mb"] > 0


def test_long_rows_only_outside_quick():
    assert list(step.selected_models(step.parse_args(["--quick", "--long"]))) == [
        "mlp", "encoder", "gpt2", "cnn"]
    full = step.parse_args(["--long"])
    assert list(step.selected_models(full))[-2:] == ["encoder_T1024", "gpt2_V50257"]
    assert step.selected_models(full)["gpt2_V50257"].size["vocab"] == 50257
    with pytest.raises(SystemExit):
        step.parse_args(["--models", "nope"])
