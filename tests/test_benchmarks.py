"""``benchmarks.step`` in a tiny configuration: structure of its JSON, table and plot; the memory,
FLOP-floor and variant modules it uses."""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fx_bk
from benchmarks import flops, memory, report, step, variants

pytest.importorskip("opacus")


def _finite_pos(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.fixture
def _process_state(monkeypatch):
    """``step.main`` sets the thread count and cold Inductor caches (config and environment)
    for the whole process: restored after the test. The config entry is restored by assignment:
    pytest's ``monkeypatch.setattr`` undoes an attribute missing from a module's ``__dict__``
    with ``delattr`` (pytest >= 9.2), which hides a torch config entry for the rest of the
    process."""
    threads = torch.get_num_threads()
    cold = torch.compiler.config.force_disable_caches
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES",
                       os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "0"))
    yield
    torch.compiler.config.force_disable_caches = cold
    torch.set_num_threads(threads)


def test_step_benchmark_tiny_run(tmp_path, capsys, _process_state):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    res = step.main(["--quick", "--models", "mlp", "--batch", "4", "--rounds", "1",
                     "--steps-per-round", "1", "--warmup", "0", "--no-memory",
                     "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out

    data = json.loads(out_json.read_text())
    assert set(data) >= {"machine", "config", "models", "wall_s"}
    assert "partial" not in data and f"wrote {out_json} (partial: mlp)" in text
    assert {"cpu", "cpu_count", "threads", "torch", "date"} <= set(data["machine"])
    assert list(data["models"]) == ["mlp"]
    m = data["models"]["mlp"]
    assert m["size"]["B"] == 4 and m["params"] > 0
    assert list(m["variants"]) == list(variants.VARIANTS)
    for name, r in m["variants"].items():
        assert r["error"] is None, (name, r["error"])  # Opacus supports the MLP
        assert r["n_steps"] == 1
        for k in ("median_ms", "p25_ms", "p75_ms", "ratio", "ratio_p25", "ratio_p75",
                  "first_step_s"):
            assert _finite_pos(r[k]), (name, k, r[k])
    assert m["variants"][variants.BASELINE]["ratio"] == 1.0
    assert data["config"]["cold_caches"] and data["machine"]["inductor_caches_disabled"]
    fx = m["variants"]["fx_bk compiled"]  # first call, and the fx_bk passes' part of it
    assert _finite_pos(fx["first_step_ratio"])
    assert 0 < fx["fx_bk_passes_s"] < fx["first_step_s"]
    assert m["variants"]["non-private compiled"]["fx_bk_passes_s"] is None
    for name in ("fx_bk compiled", "Opacus hooks", "Opacus ghost"):  # same clipped sum
        assert m["variants"][name]["grad_check_rel_diff"] < 1e-4, name
    floor = m["floor"]
    assert floor["base_flops"] > 0
    assert floor["extra_flops"] == floor["bk_flops"] - floor["base_flops"]
    assert math.isfinite(floor["floor"]) and floor["floor"] >= 1.0

    for name in variants.VARIANTS:
        assert f"| mlp | {name} |" in text, name
    assert "arithmetic floor" in text and f"= {floor['floor']:.3f}" in text
    assert "first call s (÷ non-private)" in text and "bf16" not in text
    assert f"| {fx['first_step_s']:.1f} ({fx['first_step_ratio']:.2f}x) |" in text
    if res.get("plot"):  # matplotlib installed
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for i, row in enumerate(m["variants"].values()):  # memory columns, as add_memory fills them
        row["memory"] = {"peak_mb": 10.0 + i, "rss_delta_mb": 100.0, "rss_steady_delta_mb": 90.0}
        row["memory_ratio"], row["rss_ratio"] = 1.0 + i, 1.0
    lines = report.table(data).splitlines()
    rows = [ln for ln in lines if any(ln.startswith(f"| mlp | {n} |") for n in variants.VARIANTS)]
    header = next(ln for ln in lines if ln.startswith("| model | variant"))
    assert {ln.count("|") for ln in rows} == {header.count("|")}
    assert "| 11.0 | 2.00x | 100 [90] | 1.00x |" in rows[1]


def test_step_benchmark_bf16_autocast(tmp_path, capsys, _process_state):
    """``--autocast bf16``: the two compiled variants once more with a bf16 forward; their step
    ratio, and gradients that differ from float32 by bf16 rounding (not 0: autocast ran)."""
    out_json = tmp_path / "r.json"
    step.main(["--quick", "--models", "mlp", "--batch", "4", "--rounds", "1",
               "--steps-per-round", "1", "--warmup", "0", "--no-memory", "--no-plot",
               "--autocast", "bf16", "--variants", "non-private eager", "--json",
               str(out_json)])
    text = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["models"]["mlp"]["variants"]
    assert list(rows) == ["non-private eager", variants.BASELINE, "fx_bk eager",
                          *variants.AUTOCAST_VARIANTS]
    fx, np_ = rows["fx_bk compiled bf16"], rows["non-private compiled bf16"]
    for r in (fx, np_):
        assert r["error"] is None and _finite_pos(r["ratio"]), r
        assert 1e-5 < r["grad_check_rel_diff"] < 0.2  # relative L2: bf16 rounding
    assert fx["pair_ref"] == "non-private compiled bf16" and _finite_pos(fx["pair_ratio"])
    assert fx["pair_ratio"] == pytest.approx(fx["ratio"] / np_["ratio"])  # one round
    assert "bf16: fx_bk ÷ non-private" in text
    assert f"| {fx['pair_ratio']:.2f}x [" in text


def _quick_mlp(batch: int | None = None):
    args = step.parse_args(["--quick", "--models", "mlp"]
                           + ([] if batch is None else ["--batch", str(batch)]))
    bm = step.selected_models(args)["mlp"]
    torch.manual_seed(0)
    return args, bm, bm.build(), *bm.batch(0)


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_memory_subprocess_reports_peak_rss_and_tensor_peak():
    args, bm, base, x, y = _quick_mlp(batch=4)
    args.memory_steps = 1
    mem = memory.measure_memory(args, "mlp", "non-private eager", timeout=120)
    assert "error" not in mem, mem
    assert mem["peak_rss_mb"] >= mem["rss_before_mb"] > 0
    assert "tensor_peak_error" not in mem, mem
    assert mem["tensor_peak_mb"] * 2**20 >= 2 * _param_bytes(base)  # parameters + grads


@pytest.mark.parametrize("variant", ["non-private eager", "fx_bk eager"])
def test_tensor_peak_counts_training_state_and_the_step(variant):
    args, bm, base, x, y = _quick_mlp(batch=4)
    v = variants.build_variant(variant, bm, base, args)
    assert v.error is None and v.model is not None and v.opt is not None
    for _ in range(2):
        v.step_fn(x, y)
    params = _param_bytes(base)
    live = memory.training_bytes(v, x, y)  # grads are None between steps (set_to_none)
    assert live == params + x.numel() * x.element_size() + y.numel() * y.element_size()
    peak = memory.tensor_peak(v, x, y, "cpu")
    assert peak["memory_events"] > 0 and peak["tensor_transient_mb"] > 0
    assert peak["tensor_live_mb"] * 2**20 == live
    assert peak["tensor_peak_mb"] * 2**20 >= 2 * params  # parameters + the grads the step makes
    assert abs(peak["tensor_step_net_mb"]) * 2**20 < params  # what the step made, it freed


def test_floor_is_measured_and_rank_one_mlp_is_close_to_one():
    args, bm, base, x, y = _quick_mlp()
    floor = flops.measure_floor(bm, base, x, y, max_grad_norm=1.0)
    assert floor["base_flops"] > 0 and floor["bk_flops"] >= floor["base_flops"]
    assert floor["extra_flops"] == floor["bk_flops"] - floor["base_flops"]
    assert floor["floor"] == floor["bk_flops"] / floor["base_flops"]
    assert [r["rule"] for r in floor["rules"]] == ["linear/rank-one"]
    assert 1.0 <= floor["floor"] < 1.01  # rank-one: norms are elementwise, the clipped GEMM
    # takes the non-private weight-gradient GEMM's place


@pytest.mark.parametrize("block", [None, 16])
def test_flop_counter_counts_ghost_norm(block):
    from torch.utils.flop_counter import FlopCounterMode

    from fx_bk.kernels.ghost_norm import ghost_cost

    a, g = torch.randn(3, 100, 8), torch.randn(3, 100, 5)  # [N, T, d], [N, T, p]
    kwargs = {} if block is None else {"block": block}
    with FlopCounterMode(display=False) as counter:
        torch.ops.fx_bk.ghost_norm(a, g, **kwargs)
    expected = 2 * 3 * ghost_cost(100, 8, 5, block or 64)
    assert expected > 0 and counter.get_total_flops() == expected


def test_long_rows_only_outside_quick():
    assert list(step.selected_models(step.parse_args(["--quick", "--long"]))) == [
        "mlp", "encoder", "gpt2", "cnn"]
    full = step.parse_args(["--long"])
    assert list(step.selected_models(full))[-2:] == ["encoder_T1024", "gpt2_V50257"]
    assert step.selected_models(full)["gpt2_V50257"].size["vocab"] == 50257
    with pytest.raises(SystemExit):
        step.parse_args(["--models", "nope"])


@pytest.mark.parametrize("conv", [torch.nn.Conv2d, torch.nn.ConvTranspose2d])
def test_flop_counter_counts_a_grouped_conv_as_its_groups(conv):
    groups, x = 4, torch.randn(3, 8, 10, 10, requires_grad=True)
    grouped = conv(8, 12, 3, groups=groups, padding=1)
    split = [conv(2, 3, 3, padding=1) for _ in range(groups)]
    with flops.flop_counter() as one:
        grouped(x).sum().backward()
    with flops.flop_counter() as per_group:
        sum(c(xg).sum() for c, xg in zip(split, x.split(2, 1))).backward()
    assert one.get_total_flops() == per_group.get_total_flops() > 0


def test_benchmarks_never_import_tests():
    for path in sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "tests" for n in names), (path.name, names)


def test_nonfinite_cost_tiny_run(capsys):
    """The masked and plain programs differ (the plain one lets a NaN sample poison the sum: a
    Linear site's, and a ghost convolution's clipped weight gradient), and the table has one
    ratio per model."""
    from benchmarks import nonfinite_cost
    from fx_bk.testing.models import MLP

    threads = torch.get_num_threads()
    try:
        nonfinite_cost.main(["--quick", "--models", "mlp", "--rounds", "2",
                             "--steps-per-round", "1"])
    finally:
        torch.set_num_threads(threads)
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| mlp |")]
    assert len(row) == 1 and float(row[0].split("|")[4].split()[0]) > 0
    def ghost_conv():  # L = 4 output positions: a ghost site
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.Flatten(),
                             nn.Linear(32, 2))

    for build, shape, weight in ((MLP, (4, 12), lambda m: m.net[0].weight),
                                 (ghost_conv, (4, 3, 8, 8), lambda m: m[0].weight)):
        x = torch.randn(shape)
        x[1].view(-1)[0] = float("nan")
        grads = {}
        for masked in (True, False):
            model = build()
            bk = fx_bk.transform(model, max_grad_norm=1.0)
            with contextlib.nullcontext() if masked else nonfinite_cost.unmasked(), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bk(x).sum().backward()
            grads[masked] = weight(model).grad
        assert torch.isfinite(grads[True]).all() and not torch.isfinite(grads[False]).all()


def test_lengths_benchmark_tiny_run(capsys):
    """``benchmarks.lengths`` end to end (eager, tiny): both tables, ratios, trace count."""
    from benchmarks import lengths

    threads = torch.get_num_threads()
    try:
        res = lengths.main(["--quick", "--eager", "--d", "32", "--layers", "1", "--vocab", "64",
                            "--max-len", "32", "--rounds", "3", "--fixed", "16",
                            "--fixed-steps", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "fx_bk / non-private:" in out and "| 16 |" in out
    assert _finite_pos(res["variable"]["ratio"]["median"])
    assert res["variable"]["bk_traces"] == 2  # the first length, then the symbolic one
    assert len(res["variable"]["lengths"]) == 3
    assert _finite_pos(res["fixed"][0]["ratio"])


def test_gpu_profile_tiny_run_restores_the_op(capsys):
    """``benchmarks.gpu_profile`` end to end on the CPU (the quick encoder, which has ghost-norm
    sites): every variant timed, the profile printed, and the swapped parts of the ghost-norm
    op put back."""
    import fx_bk.kernels.ghost_norm as op
    import fx_bk.step_guard as guard
    from benchmarks import gpu_profile

    saved = op.recompute_cancelling, op._triton_available, guard._check_finite
    threads = torch.get_num_threads()
    try:
        res = gpu_profile.main(["--model", "encoder", "--quick", "--device", "cpu",
                                "--rounds", "1", "--steps", "1"])
    finally:
        torch.set_num_threads(threads)
    assert (op.recompute_cancelling, op._triton_available, guard._check_finite) == saved
    out = capsys.readouterr().out
    assert "| guard as bound |" in out and "profiled fx_bk step" in out
    assert set(res["ratio"]) == {"non-private compiled", "fx_bk compiled", "guard as bound",
                                 "no host sync", "ghost norm in PyTorch"}
    assert all(_finite_pos(r) for r in res["ratio"].values())
    assert res["profile"]["top"] and "aten::nonzero" in res["profile"]["waits"]


def test_step_gap_categories_and_gemm_flops():
    """``benchmarks.step_gap`` puts an op's GEMMs and the rest of its time in the op's category
    (a clipped GEMM's own GEMM with the plain GEMMs, as the weight-gradient GEMM it replaces),
    and counts a GEMM's FLOPs from its recorded shapes: the ghost norm's block-row GEMMs add up
    to its FLOP formula."""
    from benchmarks import step_gap
    from fx_bk.kernels.clipped_gemm import clipped_gemm
    from fx_bk.kernels.ghost_norm import ghost_cost, ghost_norm

    b, t, d, p = 3, 80, 6, 5  # two block rows of the ghost norm (64 + 16 positions)
    a, g = torch.randn(b, t, d), torch.randn(b, t, p)
    with torch.profiler.profile(record_shapes=True) as prof:
        ghost_norm(a, g)
        clipped_gemm(a, g, torch.rand(b) + 0.5, False)
        torch.mm(a[0], a[0].t())
    cats: dict[str, list] = {}
    for e in prof.events():
        cats.setdefault(step_gap.category(e), []).append(e)
    ghost = cats["ghost norms: GEMMs"]
    assert {e.name for e in ghost} == {"aten::bmm"} and len(ghost) == 4  # A and Q per row
    assert sum(step_gap.gemm_flops(e) for e in ghost) == 2 * b * ghost_cost(t, d, p)
    assert "fx_bk::ghost_norm" in {e.name for e in cats["ghost norms: rest"]}
    mms = [e for e in cats["GEMMs"] if e.name == "aten::mm"]  # (matmul: the @ around one)
    assert {e.name for e in cats["GEMMs"]} <= {"aten::mm", "aten::matmul"} and len(mms) == 2
    assert "aten::mul" in {e.name for e in cats["clipped GEMMs: rest"]}  # the scaling
    assert sorted(step_gap.gemm_flops(e) for e in mms) == sorted([2 * t * d * t,
                                                                  2 * p * b * t * d])


def test_step_gap_inductor_kernels_before_op_names():
    """An Inductor kernel is counted as one whatever ATen ops its fused name lists (a group
    norm's backward fused with its convolution's is named ``..._convolution_backward_...``);
    the ATen convolution and attention ops keep their categories."""
    from benchmarks import step_gap

    def event(name):
        return types.SimpleNamespace(name=name, cpu_parent=None)

    fused = "graph_1_cpp_fused_add_convolution_backward_native_group_norm_3"
    assert step_gap.category(event(fused)) == "Inductor kernels"
    assert step_gap.category(event("graph_0_cpp_fused__scaled_dot_product_attention_1")) == \
        "Inductor kernels"
    assert step_gap.category(event("aten::convolution_backward")) == "convolutions"
    assert step_gap.category(event("aten::_scaled_dot_product_flash_attention_for_cpu")) == \
        "attention"


def test_malloc_settings(monkeypatch):
    """The benchmarks' headers name the glibc malloc tunables in the environment, which decide
    how often the steps page-fault."""
    from benchmarks.report import malloc_settings

    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert malloc_settings() == "default malloc settings"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    assert malloc_settings() == "MALLOC_TRIM_THRESHOLD_=17179869184"


def test_step_gap_tiny_run():
    """The script end to end on the quick MLP: both variants timed and profiled, fx_bk's own ops
    only in its profile, the table printed; the thread count restored."""
    from benchmarks import step_gap

    threads = torch.get_num_threads()
    (res,) = step_gap.main(["--models", "mlp", "--quick", "--rounds", "1", "--steps", "1",
                            "--profiled-steps", "1", "--threads", "1"])
    assert torch.get_num_threads() == threads
    base, priv = (res["profile"][k]["ms"] for k in (step_gap.BASELINE, step_gap.PRIVATE))
    assert priv.get("fx_bk guards", 0) > 0 and "fx_bk guards" not in base
    assert base["GEMMs"] > 0 and priv["GEMMs"] > 0
    assert _finite_pos(res["ratio"]) and res["floor"] == pytest.approx(1.0, abs=0.05)
    assert "| category | non-private ms |" in step_gap.report(res)
    assert all(f >= 0 for f in res["page_faults"].values())
    assert "minor page faults per timed step" in step_gap.report(res)


def test_memory_peak_contents_and_categories():
    """``benchmarks.memory_peak`` finds the running sum's maximum and what is alive there, each
    allocation in the category of its first telling parent."""
    from benchmarks import memory_peak

    assert memory_peak.category(["aten::empty", "aten::new_empty",
                                 "fx_bk::conv_per_sample_weight_grad", "## Call X ##",
                                 "CompiledFunctionBackward"]) == \
        "fx_bk::conv_per_sample_weight_grad"
    assert memory_peak.category(["## Call X ##", "CompiledFunctionBackward"]) == "backward"
    assert memory_peak.category(["aten::resize_", "aten::mkldnn_convolution", "## Call X ##",
                                 "CompiledFunction"]) == "forward"
    assert memory_peak.category(["aten::_log_softmax"]) == "other"
    fwd, bwd = ["## Call F ##", "CompiledFunction"], ["## Call B ##", "CompiledFunctionBackward"]
    events = [(0, 1, 100, fwd), (1, 2, 50, fwd), (2, 2, -50, bwd), (3, 3, 80, bwd),
              (4, 1, -100, bwd), (5, 4, 60, bwd), (6, 3, -80, bwd), (7, 4, -60, bwd)]
    res = memory_peak.peak_contents(events)
    assert res["peak_bytes"] == 180  # at t = 3: allocations 1 and 3
    assert res["by_category"] == {"forward": 100, "backward": 80}
    assert [size for size, _ in res["largest"]] == [100, 80]
    assert res["running"].endswith("in backward")


def test_memory_peak_tiny_run():
    """The script end to end on the quick CNN: both variants profiled, the alive bytes at least
    the transient peak (tensors from before the step freed on the way only lower the running
    sum), fx_bk's per-sample convolution gradients among them, the table printed."""
    from benchmarks import memory_peak

    threads = torch.get_num_threads()
    (res,) = memory_peak.main(["--models", "cnn", "--quick", "--warmup", "2", "--threads", "1"])
    assert torch.get_num_threads() == threads
    for v in res["variants"].values():
        assert v["peak_bytes"] > 0 and sum(v["by_category"].values()) >= v["peak_bytes"]
    priv = res["variants"][memory_peak.PRIVATE]["by_category"]
    assert priv.get("fx_bk::conv_per_sample_weight_grad", 0) > 0
    assert "fx_bk::" not in " ".join(res["variants"][memory_peak.BASELINE]["by_category"])
    assert "| alive at the peak |" in memory_peak.report(res, 3)
