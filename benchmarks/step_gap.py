"""Where fx_bk's compiled step spends the time the non-private compiled step does not (CPU).

``python -m benchmarks.step_gap [--models mlp encoder gpt2 cnn] [--quick] [--rounds N]
[--steps N] [--profiled-steps N] [--json PATH]``

Per model, non-private compiled and fx_bk compiled from the same weights and batch (the
variants of ``benchmarks.step``): interleaved timed rounds (median step ms and their ratio), the
arithmetic floor (``benchmarks.flops``: counted FLOPs of the fx_bk step over the non-private
one's), then a few steps of each under ``torch.profiler`` with Inductor's C++ kernels recorded
one by one (``torch._inductor.config.cpp.enable_kernel_profile``). Every profiled event's self
time goes to one category:

* inside one of fx_bk's opaque ops (found through the event's parents): ``ghost norms``,
  ``per-sample conv gradients``, ``clipped GEMMs``, ``embedding gradients``, each split into
  its GEMMs (``mm`` / ``bmm``: the per-sample arithmetic) and the rest (copies, elementwise
  work, the op's Python); the clipped GEMMs' own GEMM is counted with ``GEMMs``, as the
  weight-gradient GEMM it replaces is in the non-private step;
* outside them, by name: ``GEMMs``, ``Inductor kernels`` (the fused pointwise and reduction
  kernels, BK's clip stage among them; matched before the op names, which their own names
  carry: ``cpp_fused_convolution_backward_native_group_norm_...`` is a normalization's backward,
  not a convolution), ``convolutions``, ``attention``, ``fx_bk guards`` (fx_bk's other ops: the
  step token, the change check, the norm record), ``other ATen ops``, and ``framework``
  (Python, Dynamo's and AOTAutograd's wrappers, the optimizer).

Printed per model: the table of category ms per step for both variants and the difference, the
FLOP rate of the per-sample GEMMs (FLOPs from the recorded shapes) against the non-private
step's GEMMs (per-sample arithmetic at the floor's FLOP count but a lower rate is the part of
the gap the floor does not show), and the minor page faults per timed step of each variant.
Page faults are the cost of fresh memory: glibc's ``malloc`` gives large freed blocks back to
the kernel, and the next tensor touches new pages (about 1.3 us per 4 KiB page on the benchmark
host, spent inside whichever kernel first writes the tensor); how often depends on the
process's allocation history and on the ``MALLOC_*`` tunables, which the header prints
(docs/benchmarks.md, "Page faults"). Both variants are compiled, timed and profiled with the
kernel profiling compiled in (each fused kernel records itself), so the timed ratios read a
few points above ``benchmarks.step``'s. On 2 threads timings move by several percent between
runs; the categories' differences are read against the timed ratio of the same run.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from collections import defaultdict

import torch

from benchmarks.bench_models import bench_models
from benchmarks.flops import measure_floor
from benchmarks.report import malloc_settings, model_parser, run_models
from benchmarks.variants import BASELINE, PRIVATE, compiled_pair

OPAQUE = {  # fx_bk's opaque ops -> category
    "fx_bk::ghost_norm": "ghost norms",
    "fx_bk::gemm_norm_by_length": "ghost norms",
    "fx_bk::conv_per_sample_weight_grad": "per-sample conv gradients",
    "fx_bk::clipped_gemm": "clipped GEMMs",
    "fx_bk::embedding_weight_grad": "embedding gradients",
}
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"}


def parse_args(argv=None) -> argparse.Namespace:
    p = model_parser(__doc__)
    p.add_argument("--rounds", type=int, default=8, help="interleaved timed rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--profiled-steps", type=int, default=3)
    return p.parse_args(argv)


def _opaque_parent(event) -> str | None:
    while event is not None:
        if event.name in OPAQUE:
            return event.name
        event = event.cpu_parent
    return None


def category(event) -> str:
    """The category of one profiler event's self time (see the module docstring)."""
    name = event.name
    inside = _opaque_parent(event)
    if inside == "fx_bk::clipped_gemm" and name in GEMMS:
        return "GEMMs"  # the weight gradients' GEMMs, as non-private's (the scaling: "rest")
    if inside is not None:
        return f"{OPAQUE[inside]}: {'GEMMs' if name in GEMMS else 'rest'}"
    if name in GEMMS:
        return "GEMMs"
    if name.startswith("graph_") and "cpp_fused" in name:
        return "Inductor kernels"  # before the op names its fused nodes carry
    if "convolution" in name:
        return "convolutions"
    if "attention" in name:
        return "attention"
    if name.startswith("fx_bk::"):
        return "fx_bk guards"
    if name.startswith("aten::"):
        return "other ATen ops"
    return "framework"


def gemm_flops(event) -> int:
    """``2 M N K`` (times the batch) of an ``mm`` / ``addmm`` / ``bmm`` event from its recorded
    input shapes; 0 for other events."""
    shapes = [s for s in event.input_shapes if s]
    if event.name in ("aten::mm", "aten::bmm"):
        a, b = shapes[0], shapes[1]
    elif event.name in ("aten::addmm", "aten::baddbmm"):
        a, b = shapes[1], shapes[2]
    else:
        return 0
    return 2 * math.prod(a) * b[-1]


def profile_steps(step, n: int) -> dict:
    """Category -> self ms per step, and GEMM FLOPs / ms per GEMM category, over ``n`` steps."""
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(n):
            step()
    ms: dict[str, float] = defaultdict(float)
    flops: dict[str, int] = defaultdict(int)
    for e in prof.events():
        cat = category(e)
        ms[cat] += e.self_cpu_time_total / 1e3 / n
        if cat.endswith("GEMMs"):
            flops[cat] += gemm_flops(e) // n
    return {"ms": dict(ms), "gemm_flops": dict(flops)}


def minor_faults() -> int:
    """This process's minor page faults so far (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(step, steps: int) -> tuple[float, float]:
    """Mean ms and minor page faults per step over ``steps`` steps."""
    f0, t0 = minor_faults(), time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) * 1e3 / steps, (minor_faults() - f0) / steps


def run_model(bm, args) -> dict:
    base, x, y, variants = compiled_pair(bm)
    floor = measure_floor(bm, base, x, y, 1.0)["floor"]
    steps = {name: (lambda v=v: v.step_fn(x, y)) for name, v in variants.items()}
    for step in steps.values():  # compile, warm up
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in list(steps)[r % 2:] + list(steps)[:r % 2]:
            ms, pf = _timed(steps[name], args.steps)
            times[name].append(ms)
            faults[name].append(pf)
    ratios = [p / b for p, b in zip(times[PRIVATE], times[BASELINE])]
    prof = {name: profile_steps(step, args.profiled_steps) for name, step in steps.items()}
    return {"model": bm.name, "describe": bm.describe(), "floor": floor,
            "median_ms": {k: statistics.median(v) for k, v in times.items()},
            "ratio": statistics.median(ratios), "profile": prof,
            "page_faults": {k: statistics.median(v) for k, v in faults.items()}}


def rate(profile: dict, cat: str) -> float | None:
    """GFLOP/s of a GEMM category."""
    ms, flops = profile["ms"].get(cat, 0.0), profile["gemm_flops"].get(cat, 0)
    return flops / ms / 1e6 if ms > 0 and flops else None


def report(res: dict) -> str:
    base, priv = res["profile"][BASELINE], res["profile"][PRIVATE]
    total = {k: sum(p["ms"].values()) for k, p in res["profile"].items()}
    np_ms = res["median_ms"][BASELINE]
    lines = [f"### {res['model']} ({res['describe']})", "",
             f"timed: non-private {np_ms:.1f} ms, fx_bk {res['median_ms'][PRIVATE]:.1f} ms, "
             f"ratio {res['ratio']:.3f} (floor {res['floor']:.3f}); profiled self time "
             f"{total[BASELINE]:.1f} / {total[PRIVATE]:.1f} ms per step; minor page faults per "
             f"timed step {res['page_faults'][BASELINE]:.0f} / {res['page_faults'][PRIVATE]:.0f}",
             "",
             "| category | non-private ms | fx_bk ms | difference ms | % of non-private |",
             "|---|---:|---:|---:|---:|"]
    cats = sorted(set(base["ms"]) | set(priv["ms"]),
                  key=lambda c: -(priv["ms"].get(c, 0) - base["ms"].get(c, 0)))
    for c in cats:
        b, p = base["ms"].get(c, 0.0), priv["ms"].get(c, 0.0)
        lines.append(f"| {c} | {b:.2f} | {p:.2f} | {p - b:+.2f} | "
                     f"{100 * (p - b) / total[BASELINE]:+.1f} |")
    rates = {c: rate(priv, c) for c in priv["gemm_flops"]}
    base_rate = rate(base, "GEMMs")
    if base_rate:
        fx = ", ".join(f"{c} {r:.0f}" for c, r in sorted(rates.items()) if r)
        lines += ["", f"GEMM rates, GFLOP/s: non-private GEMMs {base_rate:.0f}; fx_bk: {fx}"]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch._inductor.config as inductor_config

    models = bench_models(args.quick, False)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x "
          f"{args.steps} steps, {args.profiled_steps} profiled steps per variant; "
          f"{malloc_settings()}\n")
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        return run_models(args.models, lambda name: run_model(models[name], args), report,
                          args.threads, args.json)


if __name__ == "__main__":
    main()
