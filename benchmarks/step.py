"""Training-step time and memory: non-private vs fx_bk vs Opacus, on four models.

``python -m benchmarks.step [--quick] [--long] [--models mlp encoder gpt2 cnn] [--rounds N]
[--autocast bf16] [--device cuda] [--warm-caches] [--no-memory] [--json PATH] [--plot PATH]``

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
* ``fx_bk eager`` / ``fx_bk compiled``: ``fx_bk.transform(model, max_grad_norm=R)``; the 1/B
  averaging of the clipped sum is the SGD learning rate's scale (no noise is drawn)
* with ``--autocast bf16``, also ``non-private compiled bf16`` / ``fx_bk compiled bf16``: the
  forward under ``torch.autocast(device, dtype=torch.bfloat16)``, the loss (float32) and the
  backward outside it, as AMP does; reported: their step-time ratio per round, and the first
  clipped gradient's difference from the float32 eager one of the same kind (non-private /
  fx_bk)

A variant that fails on a model is reported as ``n/a (reason)``. The modules, one per concern:

* ``benchmarks/variants.py``: the step builders above (``build_variant``);
* ``benchmarks/timing.py``: per model, each variant's first step (tracing / compilation, cold:
  every compilation with fresh, empty Inductor caches, see ``--warm-caches``; for fx_bk also
  the time of its passes) timed separately, a few warm-up steps, then interleaved rounds
  (round-robin over the variants, rotating who goes first, ``--steps-per-round`` steps each,
  more where steps are shorter than ``--min-round-ms``). Reported: median / p25 / p75 step time
  over all timed steps, and the ratio to non-private compiled computed per round (median step of
  the variant / median step of the baseline in the same round), then the median (p25, p75) over
  rounds. The clipped gradients of the first step of every private variant are compared with
  those of ``fx_bk eager`` (same weights, same batch);
* ``benchmarks/memory.py`` (``--no-memory`` skips it): one fresh subprocess per (model, variant)
  runs only that variant for a few steps, then one more step under ``torch.profiler`` (never
  while timing). Peak memory, the headline: on CPU the tensor peak (the peak of the running sum
  of that step's allocator events plus the bytes training holds alive before it: parameters,
  grads, optimizer state, batch), the analogue of ``torch.cuda.max_memory_allocated``; on CUDA
  ``torch.cuda.max_memory_allocated``. Also the peak RSS minus the RSS before the model is built
  (compilation included), and that of the steady steps after the first. Ratios are to
  non-private compiled;
* ``benchmarks/flops.py``: the arithmetic floor per model, FLOPs of one fx_bk step over those of
  one non-private step, both counted by ``FlopCounterMode`` (forward + loss + backward, eager;
  matmul-like ops, convolutions, attention, ``fx_bk::ghost_norm``; not elementwise ops or
  reductions), ``floor = bk / base``, printed next to the measured fx_bk compiled ratio;
* ``benchmarks/report.py``: the markdown table and the bar chart.

After each model its rows are printed and the results so far written to the JSON file (with
``"partial": true`` until the run ends), so a run stopped early keeps the models it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

from benchmarks.bench_models import LONG_NAMES, MODEL_NAMES, BenchModel, bench_models
from benchmarks.memory import add_memory, memory_child, memory_server
from benchmarks.report import machine_info, plot, table
from benchmarks.timing import run_model, warm_compiler
from benchmarks.variants import AUTOCAST_VARIANTS, BASELINE, VARIANTS, ieee_float32

RESULTS = Path(__file__).resolve().parent / "results"


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
    p.add_argument("--autocast", choices=["bf16"], default=None,
                   help="also run non-private compiled and fx_bk compiled with the forward under "
                        "torch.autocast(device, dtype=torch.bfloat16)")
    p.add_argument("--warm-caches", action="store_true",
                   help="keep Inductor's caches (default: torch.compiler.config."
                        "force_disable_caches, every compilation cold)")
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
        if v not in VARIANTS + AUTOCAST_VARIANTS:
            p.error(f"--variants: unknown variant {v!r} (choose from "
                    f"{', '.join(VARIANTS + AUTOCAST_VARIANTS)})")
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
    if args.autocast:
        chosen |= set(AUTOCAST_VARIANTS)
    return [v for v in VARIANTS + AUTOCAST_VARIANTS if v in chosen]


def cold_caches(warm: bool) -> None:
    """Unless ``warm``: every compilation with fresh, empty Inductor caches (no FX graph or
    AOTAutograd cache hit, no kernel compiled by an earlier variant or run), also in the memory
    subprocesses, which inherit the environment variable."""
    if not warm:
        torch.compiler.config.force_disable_caches = True
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"


def _write_partial(results: dict, json_path: str, name: str) -> None:
    """After each model: its rows printed (memory columns empty until the end) and the results
    so far written as JSON with ``"partial": true``, so that a run stopped later (a slow model's
    rounds, a time limit) keeps the models it finished."""
    results["partial"] = True
    print("\n" + table({**results, "models": {name: results["models"][name]}}), flush=True)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {json_path} (partial: {', '.join(results['models'])})", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    ieee_float32(args.device)
    cold_caches(args.warm_caches)
    # Opacus's hooks on a model whose input (token ids) needs no grad: harmless, once per step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # cold caches
    if args.memory_server:
        memory_server(args)
        return {}
    if args.memory_child:
        print("MEMORY " + json.dumps(memory_child(args)), flush=True)
        return {}
    t_start = time.perf_counter()
    warm_compiler(args.device)
    models = selected_models(args)
    variant_names = selected_variants(args)
    results = {
        "machine": machine_info(args),
        "config": {"quick": args.quick, "long": args.long, "rounds": args.rounds,
                   "steps_per_round": args.steps_per_round, "min_round_ms": args.min_round_ms,
                   "warmup": args.warmup, "autocast": args.autocast,
                   "cold_caches": torch.compiler.config.force_disable_caches,
                   "max_grad_norm": args.max_grad_norm, "lr": args.lr, "seed": args.seed,
                   "variants": variant_names, "memory": not args.no_memory},
        "models": {},
    }
    phases = results["phase_s"] = {}
    stem = "step-quick" if args.quick else "step"
    json_path = args.json or str(RESULTS / f"{stem}.json")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    for name, bm in models.items():
        t0 = time.perf_counter()
        results["models"][name] = run_model(bm, args, variant_names)
        phases[name] = time.perf_counter() - t0
        _write_partial(results, json_path, name)
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
    results.pop("partial", None)
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
