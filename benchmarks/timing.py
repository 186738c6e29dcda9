"""Timing rounds of one model: every variant's first step, warm-up, then interleaved rounds.

Each variant's first step (tracing / compilation) is timed separately, then ``--warmup`` steps,
then ``--rounds`` interleaved rounds (round-robin over the variants, rotating who goes first,
``--steps-per-round`` steps each, more where steps are shorter than ``--min-round-ms``).
Reported per variant: median / p25 / p75 step time over all timed steps, and the ratio to the
baseline computed per round (median step of the variant / median step of the baseline in the
same round), then the median (p25, p75) over rounds. The clipped gradients of the first step of
every private variant are compared with those of ``fx_bk eager`` (``GRAD_REFS``; the bf16
variants with the float32 eager ones). After the rounds, the model's arithmetic floor
(``benchmarks.flops``).

First steps are cold: ``benchmarks.step`` sets ``torch.compiler.config.force_disable_caches``
(a fresh, empty Inductor cache directory and cleared in-memory kernel caches for every
compilation, no FX graph / AOTAutograd cache) unless ``--warm-caches``, and ``warm_compiler``
compiles a tiny unrelated model once per process, so the one-time costs of the first compilation
(imports, the C++ compiler / ISA probes) fall on no variant. The fx_bk variants' first step is
split: ``fx_bk_passes_s``, the time of the fx_bk passes (trace, analysis, joint graph,
partition) summed from the ``fx_bk`` logger's per-pass DEBUG lines; the rest is Dynamo,
AOTAutograd, Inductor and the step itself.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time

import torch

from benchmarks.bench_models import BenchModel
from benchmarks.flops import measure_floor
from benchmarks.variants import BASELINE, build_variant, reason, sync

# first-step gradient checks: reference variant -> variants compared with it
GRAD_REFS = {"non-private eager": ("non-private compiled", "non-private compiled bf16"),
             "fx_bk eager": ("fx_bk compiled", "Opacus hooks", "Opacus ghost",
                             "fx_bk compiled bf16")}
# step-time ratios per round besides the one to the baseline: variant -> its reference
PAIRS = {"fx_bk compiled bf16": "non-private compiled bf16"}


def warm_compiler(device: str) -> None:
    """Compile a tiny model (forward + backward) once: the process's one-time costs of a first
    compilation are then paid by no benchmark variant."""
    lin = torch.nn.Linear(8, 4).to(device)
    torch.compile(lin, fullgraph=True)(torch.randn(2, 8, device=device)).sum().backward()
    torch.compiler.reset()


class PassTimer(logging.Handler):
    """Sums the times of the fx_bk passes run while it is attached (the ``fx_bk`` logger's
    DEBUG line per pass, ``"%s (%.0f ms): %s"``)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.ms = 0.0
        self.logger = logging.getLogger("fx_bk")

    def emit(self, record):
        if record.msg == "%s (%.0f ms): %s":
            self.ms += record.args[1]

    def __enter__(self):
        self._saved = self.logger.level, self.logger.propagate
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False  # the lines are counted, not printed
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._saved[0])
        self.logger.propagate = self._saved[1]


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max_p ||a_p - b_p|| / max(||b_p||, tiny) over the parameters of b."""
    worst = 0.0
    for n, gb in b.items():
        ga = a.get(n, torch.zeros_like(gb))
        worst = max(worst, ((ga - gb).norm() / gb.norm().clamp_min(1e-12)).item())
    return worst


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"median": None, "p25": None, "p75": None}
    return {"median": statistics.median(xs), "p25": _percentile(xs, 0.25),
            "p75": _percentile(xs, 0.75)}


def _round_ratios(v, ref) -> list[float]:
    """Median step of ``v`` / median step of ``ref``, per round (none where either failed)."""
    return [a / b for a, b in zip(v.round_ms, ref.round_ms)] if not (v.error or ref.error) else []


def run_model(bm: BenchModel, args, variant_names: list[str]) -> dict:
    torch.compiler.reset()  # fresh Dynamo caches per model (recompile limits)
    torch.manual_seed(args.seed)
    base = bm.build().to(args.device)
    x, y = (t.to(args.device) for t in bm.batch(args.seed))
    n_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    print(f"\n== {bm.name}: {bm.describe()} params={n_params:,} | {args.rounds} rounds x "
          f"{args.steps_per_round} steps/variant", flush=True)

    variants = [build_variant(name, bm, base, args) for name in variant_names]
    first_grads: dict[str, dict] = {}
    passes_s: dict[str, float | None] = {}
    for v in variants:
        if not v.error:
            try:
                sync(args.device)
                with PassTimer() if v.bk is not None else contextlib.nullcontext() as passes:
                    t0 = time.perf_counter()
                    first_grads[v.name] = v.step_fn(x, y, keep_grads=True).grads
                    sync(args.device)
                    v.first_step_s = time.perf_counter() - t0
                passes_s[v.name] = None if passes is None else passes.ms / 1e3
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    v.step_fn(x, y)
                sync(args.device)
                warm_ms = 1e3 * (time.perf_counter() - t0) / max(args.warmup, 1)
                spr = args.steps_per_round
                v.steps = spr if args.warmup == 0 else min(
                    8 * spr, max(spr, int(args.min_round_ms / max(warm_ms, 1e-3))))
            except Exception as e:  # noqa: BLE001
                v.error, v.first_step_s = reason(e), None
                first_grads.pop(v.name, None)
        if v.error:
            print(f"  {v.name:26s} n/a ({v.error})", flush=True)
        else:
            split = ("" if passes_s.get(v.name) is None else
                     f" (fx_bk passes {passes_s[v.name]:.2f} s)")
            print(f"  {v.name:26s} first step {v.first_step_s:.2f} s{split}", flush=True)

    for ref, others in GRAD_REFS.items():
        for v in variants:
            if v.name in others and ref in first_grads and first_grads.get(v.name) is not None:
                v.grad_check = _rel_diff(first_grads[v.name], first_grads[ref])

    live = [v for v in variants if not v.error]
    for r in range(args.rounds if live else 0):
        for v in live[r % len(live):] + live[:r % len(live)]:  # rotate who goes first
            if v.error:
                continue
            ts = []
            try:
                for _ in range(v.steps):
                    sync(args.device)
                    t0 = time.perf_counter()
                    v.step_fn(x, y)
                    sync(args.device)
                    ts.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory after a few steps
                v.error, v.times, v.round_ms = reason(e), [], []
                print(f"  {v.name:26s} n/a ({v.error})", flush=True)
                continue
            v.times += ts
            v.round_ms.append(1e3 * statistics.median(ts))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    try:  # after the timing rounds: FlopCounterMode is never active while timing
        floor = measure_floor(bm, base, x, y, args.max_grad_norm)
    except Exception as e:  # noqa: BLE001 - e.g. a model fx_bk rejects
        floor = {"error": reason(e)}

    by_name = {v.name: v for v in variants}
    baseline = by_name[BASELINE]
    rows = {}
    for v in variants:
        ms = [1e3 * t for t in v.times]
        st = _stats(ms)
        rs = _stats(ratios := _round_ratios(v, baseline))
        first_ratio = (v.first_step_s / baseline.first_step_s
                       if v.first_step_s and baseline.first_step_s else None)
        rows[v.name] = {
            "median_ms": st["median"], "p25_ms": st["p25"], "p75_ms": st["p75"],
            "ratio": rs["median"], "ratio_p25": rs["p25"], "ratio_p75": rs["p75"],
            "round_ratios": ratios, "first_step_s": v.first_step_s,
            "first_step_ratio": first_ratio, "fx_bk_passes_s": passes_s.get(v.name),
            "grad_check_rel_diff": v.grad_check, "n_steps": len(ms),
            "steps_per_round": v.steps, "times_ms": ms,
            "error": v.error,
        }
        if v.name in PAIRS and PAIRS[v.name] in by_name:  # e.g. bf16 fx_bk / bf16 non-private
            ps = _stats(_round_ratios(v, by_name[PAIRS[v.name]]))
            rows[v.name].update(pair_ref=PAIRS[v.name], pair_ratio=ps["median"],
                                pair_ratio_p25=ps["p25"], pair_ratio_p75=ps["p75"])
    del variants, base, first_grads
    gc.collect()
    return {"size": bm.size, "params": n_params, "floor": floor, "variants": rows}
