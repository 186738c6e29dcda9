"""Training-step time and memory: non-private vs fx_bk vs Opacus, on four models.

``python -m benchmarks.step [--quick] [--long] [--models mlp encoder gpt2 cnn] [--rounds N]
[--no-memory] [--json PATH] [--plot PATH]``

A step is forward + loss + backward + optimizer step (SGD). Models (``benchmarks/bench_models.py``,
each with its own batch): ``mlp`` (4 hidden layers of 1024, B=64), ``encoder``
(``fx_bk.models.TinyTransformer``: 4 pre-LN layers, d=256, T=128, B=32), ``gpt2``
(``transformers.GPT2LMHeadModel``, GPT-2-small shaped with 2 layers: d=768, 12 heads, tied
embeddings, T=128, B=16, vocab ``--vocab``; next-token loss, mean over positions per sample),
``cnn`` (ResNet-style with GroupNorm, 32x32 images, B=64). ``--long`` adds ``encoder_T1024``
(B=8) and ``gpt2_V50257``. ``--quick`` shrinks every model.

Variants, all from the same initial weights and the same batch:

* ``non-private eager`` / ``non-private compiled``: plain model, ``torch.compile(fullgraph=True)``
* ``Opacus hooks``: ``GradSampleModule(grad_sample_mode="hooks")`` + ``DPOptimizer`` with
  ``noise_multiplier=0`` (per-sample gradients, clip, sum, divide by B)
* ``Opacus ghost``: ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)`` with
  ``DPOptimizerFastGradientClipping(noise_multiplier=0)`` and ``DPLossFastGradientClipping``
  (two backward passes inside ``loss.backward()``)
* ``fx_bk eager`` / ``fx_bk compiled``: ``fx_bk.transform(model, max_grad_norm=R)``, then
  ``p.grad /= B`` (the clipped sum becomes a mean, as DP-SGD does; no noise is drawn)

A variant that fails on a model is reported as ``n/a (reason)``. Each variant's first step
(tracing / compilation; Inductor's on-disk caches make a repeated run faster, set
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for cold compile times) is timed separately, then a
few warm-up steps, then interleaved rounds (round-robin over the variants, rotating who goes
first, ``--steps-per-round`` steps each, more where steps are shorter than ``--min-round-ms``).
Reported: median / p25 / p75 step time over all timed steps, and the ratio to non-private
compiled computed per round (median step of the variant ÷ median step of the baseline in the
same round), then the median (p25, p75) over rounds. The clipped gradients of the first step of
every private variant are compared with those of ``fx_bk eager`` (same weights, same batch).

Memory (``--no-memory`` skips it): one fresh subprocess per (model, variant) runs only that
variant for a few steps, then one more step under ``torch.profiler`` (``profile_memory=True``;
never while timing). Peak memory, the headline: on CPU the tensor peak, the analogue of
``torch.cuda.max_memory_allocated``: the peak of the running sum of that step's allocator events
plus the bytes alive before it that training holds (parameters, their grads, optimizer state,
the batch); on CUDA ``torch.cuda.max_memory_allocated``. Also reported: the peak RSS
(VmHWM, compilation and the tracer's Python heap included) minus the RSS before the model
is built, and the peak RSS of the steady steps after the first (reset through
``/proc/self/clear_refs`` where the kernel allows). Ratios are to non-private compiled.

Arithmetic floor per model: FLOPs of one fx_bk step over those of one non-private step, both
counted by ``FlopCounterMode`` (forward + loss + backward, eager, on copies of the same model;
the fx_bk module is called once to trace it, then counted), ``floor = bk / base``, printed next
to the measured fx_bk compiled ratio. The counter sees matmul-like ops, convolutions (grouped
weight gradients corrected here), attention (CPU's flash SDPA through formulas added here) and
``fx_bk::ghost_norm`` (through the formula registered next to it), not elementwise ops or
reductions. Counted, not
estimated from the rules' costs: the GEMMs that take the place of the non-private
weight-gradient GEMM (instantiate's per-sample GEMMs, ghost / rank-one's clipped ``(C g)^T a``)
are not counted on top of it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fx_bk
import fx_bk.kernels.ghost_norm  # noqa: F401 - registers the FlopCounterMode formula of the op
from benchmarks.bench_models import LONG_NAMES, MODEL_NAMES, BenchModel, bench_models

BASELINE = "non-private compiled"
VARIANTS = ("non-private eager", "non-private compiled", "Opacus hooks", "Opacus ghost",
            "fx_bk eager", "fx_bk compiled")
# first-step gradient checks: reference variant -> variants compared with it
GRAD_REFS = {"non-private eager": ("non-private compiled",),
             "fx_bk eager": ("fx_bk compiled", "Opacus hooks", "Opacus ghost")}
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes of every model; whole run a few minutes on 2 CPU cores")
    p.add_argument("--long", action="store_true",
                   help=f"add the rows {', '.join(LONG_NAMES)} (ignored with --quick)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help=f"subset of {', '.join(MODEL_NAMES + LONG_NAMES)} (space or comma "
                        "separated; default: the four models, plus the long rows with --long)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="subset of the variants, comma separated (default: all; the baseline "
                        f"'{BASELINE}' and 'fx_bk eager' are always run)")
    p.add_argument("--vocab", type=int, default=None,
                   help="GPT-2 vocabulary (default 8192, 2048 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default: 8, or 4 with --quick)")
    p.add_argument("--steps-per-round", type=int, default=None,
                   help="timed steps per variant and round (default: 3, or 2 with --quick)")
    p.add_argument("--min-round-ms", type=float, default=100.0,
                   help="more steps per round for a variant whose steps are shorter than this "
                        "in total (at most 8x --steps-per-round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first step")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory subprocesses (one per model and variant)")
    p.add_argument("--memory-jobs", type=int, default=None,
                   help="memory subprocesses run at a time (default: 2 on CPU, 1 on CUDA; "
                        "each reports its own peak, timings are not taken there)")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="steps after the first in each memory subprocess")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="results as JSON (default: benchmarks/results/step[-quick].json)")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="bar chart of the ratios (default: benchmarks/results/step[-quick].png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"),
                   help=argparse.SUPPRESS)  # internal: one memory figure in this process
    p.add_argument("--memory-server", metavar="JOBS_JSON",
                   help=argparse.SUPPRESS)  # internal: fork one child per (model, variant)
    args = p.parse_args(argv)
    args.models = _split(args.models)
    args.variants = _split(args.variants)
    known = set(MODEL_NAMES + LONG_NAMES)
    for m in args.models or []:
        if m not in known:
            p.error(f"--models: unknown model {m!r} (choose from {', '.join(sorted(known))})")
    for v in args.variants or []:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    if args.quick and (args.long or set(args.models or ()) & set(LONG_NAMES)):
        print("note: --quick runs no long rows (--long and long --models ignored)", flush=True)
        args.long = False
        if args.models:
            args.models = [m for m in args.models if m not in LONG_NAMES]
    if args.memory_jobs is None:
        args.memory_jobs = 1 if args.device.startswith("cuda") else 2
    if args.rounds is None:
        args.rounds = 4 if args.quick else 8
    if args.steps_per_round is None:
        args.steps_per_round = 2 if args.quick else 3
    return args


def _split(items):
    if items is None:
        return None
    return [s.strip() for it in items for s in it.split(",") if s.strip()]


def selected_models(args) -> dict[str, BenchModel]:
    models = bench_models(args.quick, args.long or bool(set(args.models or ()) & set(LONG_NAMES)),
                          vocab=args.vocab, batch=args.batch)
    names = args.models or [n for n in models if n in MODEL_NAMES or args.long]
    return {n: models[n] for n in names}


def selected_variants(args) -> list[str]:
    chosen = set(args.variants or VARIANTS) | {BASELINE, "fx_bk eager"}
    return [v for v in VARIANTS if v in chosen]


# --------------------------------------------------------------------------- variants


class Variant:
    """One way of running a training step on its own copy of the model."""

    def __init__(self, name: str, step_fn=None, bk=None, error: str | None = None,
                 model: nn.Module | None = None, opt=None):
        self.name = name
        self.step_fn = step_fn  # (x, y, keep_grads=False) -> first-step clipped grads or None
        self.bk = bk  # the fx_bk module, for its traced program
        self.model = model  # the module whose parameters are trained (not the wrapper)
        self.opt = opt  # its optimizer (Opacus: the DPOptimizer)
        self.times: list[float] = []
        self.steps = 0  # timed steps per round
        self.round_ms: list[float] = []  # median step of each round
        self.first_step_s: float | None = None
        self.grad_check: float | None = None
        self.error = error


def _grads(model: nn.Module, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() * scale for n, p in model.named_parameters()
            if p.grad is not None}


def _plain(bm: BenchModel, model: nn.Module, compiled: bool, args) -> Variant:
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    def step(x, y, keep_grads=False):
        bm.per_sample_loss(fwd(x), y).mean().backward()
        grads = _grads(model) if keep_grads else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    return Variant("", step, model=model, opt=opt)


def _fx_bk(bm: BenchModel, model: nn.Module, compiled: bool, args) -> Variant:
    bk = fx_bk.transform(model, max_grad_norm=args.max_grad_norm)
    fwd = torch.compile(bk, fullgraph=True) if compiled else bk
    params = [p for p in model.parameters() if p.requires_grad]
    # DP-SGD averages the clipped sum over the expected batch size (a constant, as in Opacus's
    # DPOptimizer); for SGD that is a learning-rate scale, not an extra pass over the gradients
    opt = torch.optim.SGD(params, lr=args.lr / bm.batch_size)

    def step(x, y, keep_grads=False):
        bm.per_sample_loss(fwd(x), y).mean().backward()  # p.grad = sum_i C_i grad_i
        grads = _grads(model) if keep_grads else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    return Variant("", step, bk=bk, model=model, opt=opt)


def _opacus_hooks(bm: BenchModel, model: nn.Module, args) -> Variant:
    from opacus.grad_sample.utils import get_gsm_class
    from opacus.optimizers import DPOptimizer

    B, R = bm.batch_size, args.max_grad_norm
    gsm = get_gsm_class("hooks")(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=args.lr), noise_multiplier=0.0,
                      max_grad_norm=R, expected_batch_size=B, loss_reduction="mean")

    def step(x, y, keep_grads=False):
        bm.per_sample_loss(gsm(x), y).mean().backward()  # p.grad_sample: [B, *p.shape]
        grads = None
        if keep_grads:  # clip, sum, (zero) noise, / B; report the clipped sum
            if opt.pre_step():
                grads = _grads(model, scale=B)
                opt.original_optimizer.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    return Variant("", step, model=model, opt=opt)


def _opacus_ghost(bm: BenchModel, model: nn.Module, args) -> Variant:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    B, R = bm.batch_size, args.max_grad_norm
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=R, use_ghost_clipping=True
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=args.lr), noise_multiplier=0.0, max_grad_norm=R,
        expected_batch_size=B, loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction="mean"), "mean")

    def step(x, y, keep_grads=False):
        logits, targets, shape = bm.logits_targets(gsm(x), y)
        criterion(logits, targets, shape=shape).backward()  # two passes; p.grad = clipped sum
        grads = _grads(model) if keep_grads else None
        opt.step()  # (zero) noise, divide by expected_batch_size, SGD
        opt.zero_grad(set_to_none=True)
        return grads

    return Variant("", step, model=model, opt=opt)


def build_variant(name: str, bm: BenchModel, base: nn.Module, args) -> Variant:
    model = copy.deepcopy(base)
    builders = {
        "non-private eager": lambda: _plain(bm, model, False, args),
        "non-private compiled": lambda: _plain(bm, model, True, args),
        "Opacus hooks": lambda: _opacus_hooks(bm, model, args),
        "Opacus ghost": lambda: _opacus_ghost(bm, model, args),
        "fx_bk eager": lambda: _fx_bk(bm, model, False, args),
        "fx_bk compiled": lambda: _fx_bk(bm, model, True, args),
    }
    try:
        v = builders[name]()
    except Exception as e:  # noqa: BLE001 - a rejected variant is reported as n/a
        v = Variant(name, error=_reason(e))
    v.name = name
    return v


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max_p ||a_p - b_p|| / max(||b_p||, tiny) over the parameters of b."""
    worst = 0.0
    for n, gb in b.items():
        ga = a.get(n, torch.zeros_like(gb))
        worst = max(worst, ((ga - gb).norm() / gb.norm().clamp_min(1e-12)).item())
    return worst


# --------------------------------------------------------------------------- floor


def flop_counter():
    """``FlopCounterMode`` with two gaps of torch 2.13's formulas filled: CPU's flash SDPA and its
    backward count as the CUDA kernels do (every T x T score, causal or not; without them
    attention counts 0 on CPU, in both steps, which raises the floor), and
    ``convolution_backward``'s weight gradient is divided by ``groups`` (upstream counts a
    grouped one as if every input channel met every output channel: ``groups`` times too
    much, as in a per-sample conv gradient with the batch folded into groups)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    def conv_backward(grad_out, x, w, bias, stride, padding, dilation, transposed,
                      output_padding, groups, output_mask, out_shape=None, **kwargs):
        def t(shape):  # swap the batch and channel dims
            return [shape[1], shape[0], *shape[2:]]

        flops = 0
        if output_mask[0]:  # grad_input: conv_transpose(grad_out, w), per group already
            flops += fc.conv_flop_count(grad_out, w, out_shape[0], not transposed)
        if output_mask[1]:  # grad_weight: conv(x^T, grad_out^T) (transposed: swapped)
            inp, wt = (grad_out, x) if transposed else (x, grad_out)
            flops += fc.conv_flop_count(t(inp), t(wt), t(out_shape[1])) // groups
        return flops

    mapping = {op: f for op, f in {aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
                                   aten._scaled_dot_product_flash_attention_for_cpu_backward:
                                   sdpa_backward}.items() if op not in fc.flop_registry}
    mapping[aten.convolution_backward] = conv_backward
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def step_flops(bm: BenchModel, model: nn.Module, x, y) -> int:
    """FLOPs of ``model``'s forward + loss + backward, eager (``flop_counter``: matmul-like ops,
    SDPA, convolutions and ``fx_bk::ghost_norm``; elementwise ops and reductions are free)."""
    with flop_counter() as counter:
        bm.per_sample_loss(model(x), y).mean().backward()
    return int(counter.get_total_flops())


def measure_floor(bm: BenchModel, base: nn.Module, x, y, max_grad_norm: float) -> dict:
    """Counted FLOPs of one fx_bk step over those of the non-private step, both eager on copies
    of ``base``: ``floor = bk_flops / base_flops``. The BK graphs are traced by a first call, the
    second is counted. ``rules``: the per-sample rules fx_bk chose (information only)."""
    base_f = step_flops(bm, copy.deepcopy(base), x, y)
    bk = fx_bk.transform(copy.deepcopy(base), max_grad_norm=max_grad_norm)
    bm.per_sample_loss(bk(x), y).mean().backward()  # builds the programs
    bk.zero_grad(set_to_none=True)
    bk_f = step_flops(bm, bk, x, y)
    return {"base_flops": base_f, "bk_flops": bk_f, "extra_flops": bk_f - base_f,
            "floor": bk_f / base_f, "rules": rule_detail(bk)}


def rule_detail(bk) -> list[dict]:
    """Sites per chosen rule/strategy and their summed ``site.cost`` (MACs per sample of the
    rule's estimate: the norm, and for instantiate the per-sample gradients)."""
    if bk is None or not bk.programs:
        return []
    detail: dict[str, dict] = {}
    for s in bk.programs[-1].prog.sites:
        d = detail.setdefault(f"{s.rule.name}/{s.strategy}", {"sites": 0, "macs_per_sample": 0})
        d["sites"] += 1
        d["macs_per_sample"] += int(s.cost)
    return [{"rule": k, **v} for k, v in sorted(detail.items())]


# --------------------------------------------------------------------------- stats


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


def machine_info(args) -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "inductor_caches_disabled": os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1",
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import opacus

        info["opacus"] = opacus.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- one model


def run_model(bm: BenchModel, args, variant_names: list[str]) -> dict:
    torch._dynamo.reset()  # fresh Dynamo caches per model (recompile limits)
    torch.manual_seed(args.seed)
    base = bm.build().to(args.device)
    x, y = (t.to(args.device) for t in bm.batch(args.seed))
    n_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    print(f"\n== {bm.name}: {bm.describe()} params={n_params:,} | {args.rounds} rounds x "
          f"{args.steps_per_round} steps/variant", flush=True)

    variants = [build_variant(name, bm, base, args) for name in variant_names]
    first_grads: dict[str, dict] = {}
    for v in variants:
        if not v.error:
            try:
                _sync(args.device)
                t0 = time.perf_counter()
                first_grads[v.name] = v.step_fn(x, y, keep_grads=True)
                _sync(args.device)
                v.first_step_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    v.step_fn(x, y)
                _sync(args.device)
                warm_ms = 1e3 * (time.perf_counter() - t0) / max(args.warmup, 1)
                spr = args.steps_per_round
                v.steps = spr if args.warmup == 0 else min(
                    8 * spr, max(spr, int(args.min_round_ms / max(warm_ms, 1e-3))))
            except Exception as e:  # noqa: BLE001
                v.error, v.first_step_s = _reason(e), None
                first_grads.pop(v.name, None)
        if v.error:
            print(f"  {v.name:22s} n/a ({v.error})", flush=True)
        else:
            print(f"  {v.name:22s} first step {v.first_step_s:.2f} s", flush=True)

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
                    _sync(args.device)
                    t0 = time.perf_counter()
                    v.step_fn(x, y)
                    _sync(args.device)
                    ts.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory after a few steps
                v.error, v.times, v.round_ms = _reason(e), [], []
                print(f"  {v.name:22s} n/a ({v.error})", flush=True)
                continue
            v.times += ts
            v.round_ms.append(1e3 * statistics.median(ts))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    try:  # after the timing rounds: FlopCounterMode is never active while timing
        floor = measure_floor(bm, base, x, y, args.max_grad_norm)
    except Exception as e:  # noqa: BLE001 - e.g. a model fx_bk rejects
        floor = {"error": _reason(e)}

    baseline = next(v for v in variants if v.name == BASELINE)
    rows = {}
    for v in variants:
        ms = [1e3 * t for t in v.times]
        st = _stats(ms)
        ratios = ([a / b for a, b in zip(v.round_ms, baseline.round_ms)]
                  if not v.error and not baseline.error else [])
        rs = _stats(ratios)
        rows[v.name] = {
            "median_ms": st["median"], "p25_ms": st["p25"], "p75_ms": st["p75"],
            "ratio": rs["median"], "ratio_p25": rs["p25"], "ratio_p75": rs["p75"],
            "round_ratios": ratios, "first_step_s": v.first_step_s,
            "grad_check_rel_diff": v.grad_check, "n_steps": len(ms),
            "steps_per_round": v.steps, "times_ms": ms,
            "error": v.error,
        }
    del variants, base, first_grads
    gc.collect()
    return {"size": bm.size, "params": n_params, "floor": floor, "variants": rows}


# --------------------------------------------------------------------------- memory


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float | None:
    """Peak RSS of this process's address space (Linux VmHWM), None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def training_bytes(v: Variant, x, y) -> int:
    """Bytes of the tensors a training step keeps between steps: the trained module's parameters
    and their ``.grad``, the optimizer's state tensors and the batch (one count per storage)."""
    opt = getattr(v.opt, "original_optimizer", v.opt)  # Opacus: the wrapped optimizer's state
    tensors = [t for p in v.model.parameters() for t in (p, p.grad)]
    tensors += [t for st in (opt.state.values() if opt is not None else ()) for t in st.values()]
    seen, total = set(), 0
    for t in [*tensors, x, y]:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def tensor_peak(v: Variant, x, y, device: str) -> dict:
    """Peak tensor memory of one step, the CPU analogue of ``torch.cuda.max_memory_allocated``:
    the step runs under ``torch.profiler`` with ``profile_memory=True``; the running sum of its
    allocator events (``[memory]``, signed bytes, on ``device``) in time order peaks at
    ``transient`` bytes above the start; ``live``: ``training_bytes`` before the step.
    ``tensor_peak_mb = (live + transient) / 2**20``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    live = training_bytes(v, x, y)
    kind = DeviceType.CUDA if device.startswith("cuda") else DeviceType.CPU
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v.step_fn(x, y)
        _sync(device)
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == kind),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, cur)
    return {"tensor_peak_mb": (live + peak) / 2**20, "tensor_live_mb": live / 2**20,
            "tensor_transient_mb": peak / 2**20, "tensor_step_net_mb": cur / 2**20,
            "memory_events": len(events)}


def memory_child(args) -> dict:
    """Runs in a fresh process: builds one model and one variant, a few steps, peak memory.

    ``peak_rss_mb`` is the process's peak RSS (VmHWM; ``ru_maxrss`` where /proc is missing),
    ``rss_before_mb`` its RSS before the model was built, ``steady_peak_rss_mb`` the peak over
    the steps after the first two (VmHWM reset in between, where allowed); on CUDA also
    ``torch.cuda.max_memory_allocated``. Then one more step under the profiler:
    ``tensor_peak_mb`` (``tensor_peak``), after the RSS figures were read."""
    model_name, variant = args.memory_child
    bm = selected_models(argparse.Namespace(**{**vars(args), "models": [model_name]}))[model_name]
    _preload(model_name.startswith("gpt2"))  # imports count as "before", as in every child
    gc.collect()
    out: dict = {"model": model_name, "variant": variant, "device": args.device,
                 "pid": os.getpid()}
    cuda = args.device.startswith("cuda")
    out["rss_before_mb"] = _rss_now_mb()
    torch.manual_seed(args.seed)
    base = bm.build().to(args.device)
    x, y = (t.to(args.device) for t in bm.batch(args.seed))
    v = build_variant(variant, bm, base, args)
    del base
    if v.error:
        return {**out, "error": v.error}
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        v.step_fn(x, y)
        if args.memory_steps > 0:
            v.step_fn(x, y)
        _sync(args.device)
        first_hwm = _hwm_mb()
        reset = _reset_hwm()
        if cuda:
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        for _ in range(max(args.memory_steps - 1, 1)):
            v.step_fn(x, y)
        _sync(args.device)
    except Exception as e:  # noqa: BLE001
        return {**out, "error": _reason(e)}
    out["ru_maxrss_mb"] = _maxrss_mb()
    hwm = _hwm_mb()
    out["peak_rss_mb"] = (max(first_hwm, hwm) if first_hwm is not None and hwm is not None
                          else out["ru_maxrss_mb"])
    out["steady_peak_rss_mb"] = hwm if reset else None
    if cuda:
        out["cuda_steady_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    try:
        out.update(tensor_peak(v, x, y, args.device))
    except Exception as e:  # noqa: BLE001 - the RSS / CUDA figures stand without it
        out["tensor_peak_error"] = _reason(e)
    return out


def _preload(gpt2: bool) -> None:
    """Modules every memory child imports before its baseline reading."""
    import opacus.grad_sample  # noqa: F401
    import opacus.optimizers  # noqa: F401

    if gpt2:
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401


def _child_argv(args, model: str, variant: str) -> list[str]:
    argv = ["--memory-child", model, variant, "--threads", str(args.threads),
            "--device", args.device, "--seed", str(args.seed),
            "--max-grad-norm", repr(args.max_grad_norm), "--lr", repr(args.lr),
            "--memory-steps", str(args.memory_steps)]
    if args.quick:
        argv.append("--quick")
    if args.vocab is not None:
        argv += ["--vocab", str(args.vocab)]
    if args.batch is not None:
        argv += ["--batch", str(args.batch)]
    return argv


def memory_server(args) -> None:
    """Runs in one fresh process: imports torch, fx_bk, Opacus (and transformers) once, then
    forks one child per (model, variant) of ``--memory-server`` (``--memory-jobs`` at a time).
    Each child is a new process whose address space holds only those imports; it runs
    ``memory_child`` and writes one ``MEMORY {json}`` line. The server itself never runs a
    tensor op, so forking it is safe (no OpenMP threads yet)."""
    jobs = [tuple(j) for j in json.loads(args.memory_server)]
    _preload(any(m.startswith("gpt2") for m, _ in jobs))
    if args.device.startswith("cuda"):  # no fork after CUDA was touched: one process per job
        for job in jobs:
            t0 = time.perf_counter()
            res = memory_child(argparse.Namespace(**{**vars(args), "memory_child": job}))
            res.update(job=list(job), child_s=time.perf_counter() - t0)
            print("MEMORY " + json.dumps(res), flush=True)
        return

    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < max(1, args.memory_jobs):
            job = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:  # child
                try:
                    if args.device == "cpu":
                        torch.set_num_threads(args.threads)
                    res = memory_child(argparse.Namespace(**{**vars(args), "memory_child": job}))
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    res = {"error": _reason(e)}
                res.update(job=list(job), child_s=time.perf_counter() - t0)
                try:
                    os.write(1, ("MEMORY " + json.dumps(res) + "\n").encode())
                finally:
                    os._exit(0)
            running[pid] = (job, t0)
        pid, status = os.wait()
        job, t0 = running.pop(pid)
        if status != 0:
            res = {"job": list(job), "child_s": time.perf_counter() - t0,
                   "error": f"child died (wait status {status})"}
            print("MEMORY " + json.dumps(res), flush=True)


def measure_memory(args, model: str, variant: str, timeout: float = 900) -> dict:
    """Peak memory of one variant in a fresh process (see ``memory_child``)."""
    return _run_children(args, [(model, variant)], timeout)[0]


def _run_children(args, jobs: list[tuple[str, str]], timeout: float, on_done=None) -> list[dict]:
    """Starts one ``--memory-server`` process for ``jobs`` (on CUDA one per job, run there
    without forking); returns their results in order."""
    if args.device.startswith("cuda") and len(jobs) > 1:
        return [r for job in jobs for r in _run_children(args, [job], timeout, on_done)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = _child_argv(args, "-", "-")[3:] + ["--memory-jobs", str(args.memory_jobs),
                                              "--memory-server", json.dumps(jobs)]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.step", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    drain.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    results: dict[tuple, dict] = {}
    try:
        for line in proc.stdout:
            if line.startswith("MEMORY "):
                res = json.loads(line[len("MEMORY "):])
                job = tuple(res.pop("job"))
                results[job] = res
                if on_done:
                    on_done(job, res)
        proc.wait()
        drain.join(10)
    finally:
        timer.cancel()
    tail = ([s.strip() for s in stderr if s.strip()] or [f"exit {proc.returncode}"])[-1][:160]
    out = []
    for job in jobs:
        if job not in results:
            results[job] = {"error": f"no result ({tail})"}
            if on_done:
                on_done(job, results[job])
        out.append(results[job])
    return out


def add_memory(results: dict, args) -> None:
    """One fresh process per (model, variant), ``--memory-jobs`` at a time. Per variant:
    ``peak_mb`` (CPU: ``tensor_peak_mb``; CUDA: ``cuda_max_allocated_mb``), ``rss_delta_mb``
    (peak RSS minus the RSS before the model), and their ratios to the baseline's:
    ``memory_ratio``, ``rss_ratio``."""
    cuda = args.device.startswith("cuda")
    rows = {(model, variant): row for model, res in results["models"].items()
            for variant, row in res["variants"].items()}
    for row in rows.values():
        if row["error"]:
            row["memory"] = {"error": "variant n/a"}
    jobs = [k for k, row in rows.items() if not row["error"]]

    def done(job, mem):
        model, variant = job
        if "error" not in mem:
            mem["rss_delta_mb"] = mem["peak_rss_mb"] - mem["rss_before_mb"]
            steady = mem.get("steady_peak_rss_mb")
            mem["rss_steady_delta_mb"] = None if steady is None else steady - mem["rss_before_mb"]
            mem["peak_mb"] = mem.get("cuda_max_allocated_mb" if cuda else "tensor_peak_mb")
            mem["steady_mb"] = mem.get("cuda_steady_max_allocated_mb")
            print(f"  memory {model:12s} {variant:22s} {_fmt(mem['peak_mb'], '9.1f')} MB, "
                  f"peak RSS +{mem['rss_delta_mb']:.0f} MB ({mem['child_s']:.0f} s)", flush=True)
        else:
            print(f"  memory {model:12s} {variant:22s} n/a ({mem['error']})", flush=True)
        rows[job]["memory"] = mem

    if jobs:
        _run_children(args, jobs, timeout=900 * len(jobs), on_done=done)
    for res in results["models"].values():
        base = res["variants"].get(BASELINE, {}).get("memory", {})
        for row in res["variants"].values():
            mem = row.get("memory", {})
            for key, out in (("peak_mb", "memory_ratio"), ("rss_delta_mb", "rss_ratio")):
                d, b = mem.get(key), base.get(key)
                row[out] = d / b if d is not None and b else None


# --------------------------------------------------------------------------- output


def _fmt(v, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None else format(v, spec) + suffix


def table(results: dict) -> str:
    m = results["machine"]
    cuda = m["device"].startswith("cuda")
    lines = [
        f"Machine: {m['cpu']} (platform.processor: {m['processor'] or '?'}) | "
        f"{m['cpu_count']} CPUs | {m['threads']} threads | device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"torch {m['torch']} | opacus {m.get('opacus', '?')} | python {m['python']} | "
        f"{m['date']}",
        f"{results['config']['rounds']} rounds x >= {results['config']['steps_per_round']} steps "
        f"per variant (more for steps shorter than {results['config']['min_round_ms']:.0f} ms "
        f"per round), interleaved; ratio = median over rounds of (variant / {BASELINE}) per round; "
        "memory: a fresh process per model and variant; peak memory: "
        + ("torch.cuda.max_memory_allocated, whole run [steps after the first two]" if cuda else
           "tensor peak of one steady step (allocator events under torch.profiler) plus the "
           "parameters, grads, optimizer state and batch alive before it")
        + "; peak RSS: minus the RSS before the model was built, whole run (compilation "
        "included) [steps after the first two]",
        "",
        "| model | variant | median ms | p25 ms | p75 ms | vs non-private compiled [p25, p75] "
        "| first step s | peak memory MB | memory vs non-private compiled | peak RSS MB [steady] "
        "| RSS vs non-private compiled | grad rel diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = ["", "| model | arithmetic floor | fx_bk compiled | fx_bk eager | Opacus ghost "
               "| Opacus hooks | Opacus ghost / fx_bk compiled |",
               "|---|---:|---:|---:|---:|---:|---:|"]
    for model, res in results["models"].items():
        rows = res["variants"]
        for name, r in rows.items():
            if r["error"]:
                lines.append(f"| {model} | {name} | n/a ({r['error'].replace('|', '/')}) "
                             "| | | | | | | | | |")
                continue
            mem = r.get("memory") or {}
            if not mem or "error" in mem:
                mem_s = rss_s = "-" if not mem else f"n/a ({mem['error']})"
            else:
                mem_s = _fmt(mem["peak_mb"]) + (
                    f" [{_fmt(mem['steady_mb'])}]" if mem.get("steady_mb") is not None else "")
                rss_s = (f"{mem['rss_delta_mb']:.0f} "
                         f"[{_fmt(mem.get('rss_steady_delta_mb'), '.0f')}]")
            gc_ = r["grad_check_rel_diff"]
            bold = "**" if name == "fx_bk compiled" else ""
            lines.append(
                f"| {model} | {name} | {_fmt(r['median_ms'])} | {_fmt(r['p25_ms'])} "
                f"| {_fmt(r['p75_ms'])} | {bold}{_fmt(r['ratio'], '.2f', 'x')}{bold} "
                f"[{_fmt(r['ratio_p25'], '.2f')}, {_fmt(r['ratio_p75'], '.2f')}] "
                f"| {_fmt(r['first_step_s'], '.2f')} | {mem_s} "
                f"| {_fmt(r.get('memory_ratio'), '.2f', 'x') if mem else '-'} | {rss_s} "
                f"| {_fmt(r.get('rss_ratio'), '.2f', 'x') if mem else '-'} "
                f"| {'-' if gc_ is None else format(gc_, '.1e')} |")
        fl = res["floor"] or {}
        floor_s = (f"n/a ({fl['error']})" if "error" in fl else "n/a" if not fl else
                   f"{fl['bk_flops'] / 1e9:.4g}/{fl['base_flops'] / 1e9:.4g} GFLOP "
                   f"= {fl['floor']:.3f}")

        def ratio(name, rows=rows):
            r = rows.get(name)
            if r is None:
                return "-"
            return f"n/a ({r['error'][:40]})" if r["error"] else _fmt(r["ratio"], ".2f", "x")

        fx, gh = rows.get("fx_bk compiled", {}), rows.get("Opacus ghost", {})
        speed = (gh["median_ms"] / fx["median_ms"]
                 if fx.get("median_ms") and gh.get("median_ms") else None)
        summary.append(f"| {model} | {floor_s} | {ratio('fx_bk compiled')} "
                       f"| {ratio('fx_bk eager')} | {ratio('Opacus ghost')} "
                       f"| {ratio('Opacus hooks')} | {_fmt(speed, '.2f', 'x')} |")
    lines += summary
    lines += ["", "Ratios are step time / non-private compiled. Floor: counted FLOPs of one fx_bk "
              "step over those of the non-private step (FlopCounterMode, eager forward + loss + "
              "backward; matmul-like ops, convolutions, attention, fx_bk::ghost_norm). "
              "grad rel diff: max over parameters of ||g - g_ref|| / ||g_ref|| of the first "
              "step's clipped sum (ref: fx_bk eager; non-private eager for non-private compiled)."]
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return False
    models = list(results["models"])
    names = [v for v in VARIANTS if any(v in r["variants"] for r in results["models"].values())]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(models)), 4.5))
    top = 1.0
    for j, name in enumerate(names):
        xs, hs, lo, hi = [], [], [], []
        for i, model in enumerate(models):
            r = results["models"][model]["variants"].get(name)
            x = i + (j - (len(names) - 1) / 2) * width
            if r is None or r["error"] or r["ratio"] is None:
                ax.text(x, 0.05, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            xs.append(x)
            hs.append(r["ratio"])
            lo.append(r["ratio"] - r["ratio_p25"])
            hi.append(r["ratio_p75"] - r["ratio"])
            top = max(top, r["ratio_p75"])
        ax.bar(xs, hs, width, yerr=[lo, hi], capsize=2, label=name)
    for i, model in enumerate(models):
        fl = results["models"][model]["floor"] or {}
        if "floor" in fl:
            ax.hlines(fl["floor"], i - 0.45, i + 0.45, colors="k", linestyles="--", linewidth=1,
                      label="fx_bk arithmetic floor" if i == 0 else None)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(f"step time / {BASELINE}")
    if top > 6:
        ax.set_yscale("log")
    m = results["machine"]
    ax.set_title(f"DP step time ratios ({m['device']}, {m['threads']} threads, "
                 f"torch {m['torch']}, {m['date'][:10]})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # Opacus's hooks on a model whose input (token ids) needs no grad: harmless, once per step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    if args.memory_server:
        memory_server(args)
        return {}
    if args.memory_child:
        print("MEMORY " + json.dumps(memory_child(args)), flush=True)
        return {}
    t_start = time.perf_counter()
    models = selected_models(args)
    variant_names = selected_variants(args)
    results = {
        "machine": machine_info(args),
        "config": {"quick": args.quick, "long": args.long, "rounds": args.rounds,
                   "steps_per_round": args.steps_per_round, "min_round_ms": args.min_round_ms,
                   "warmup": args.warmup,
                   "max_grad_norm": args.max_grad_norm, "lr": args.lr, "seed": args.seed,
                   "variants": variant_names, "memory": not args.no_memory},
        "models": {},
    }
    phases = results["phase_s"] = {}
    for name, bm in models.items():
        t0 = time.perf_counter()
        results["models"][name] = run_model(bm, args, variant_names)
        phases[name] = time.perf_counter() - t0
    if not args.no_memory:
        t0 = time.perf_counter()
        print("\nmemory: one fresh process per model and variant", flush=True)
        add_memory(results, args)
        phases["memory"] = time.perf_counter() - t0
    results["wall_s"] = time.perf_counter() - t_start

    print()
    print(table(results))
    print(f"\nwall time {results['wall_s']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in results["phase_s"].items()) + ")")
    stem = "step-quick" if args.quick else "step"
    json_path = args.json or str(RESULTS / f"{stem}.json")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {json_path}")
    if not args.no_plot:
        plot_path = args.plot or str(RESULTS / f"{stem}.png")
        if plot(results, plot_path):
            results["plot"] = plot_path
            print(f"wrote {plot_path}")
    return results


if __name__ == "__main__":
    main()
