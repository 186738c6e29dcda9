"""Training-step time of a small transformer: non-private vs fx_bk vs Opacus ghost clipping.

``python -m benchmarks.step [--quick] [--rounds N] [--json PATH]``

A step is forward + mean cross-entropy + backward + SGD step. Variants, all from the same initial
weights and the same batch:

* ``non-private eager`` / ``non-private compiled``: plain model, ``torch.compile(fullgraph=True)``
* ``fx_bk eager`` / ``fx_bk compiled``: ``fx_bk.transform(model, max_grad_norm=R)``, then
  ``p.grad /= B`` (the clipped sum becomes a mean, as DP-SGD does; no noise is drawn)
* ``Opacus ghost``: ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)`` with
  ``DPOptimizerFastGradientClipping(noise_multiplier=0)`` and ``DPLossFastGradientClipping``
  (two backward passes inside ``loss.backward()``).

Each variant is warmed up first (its first step, which includes tracing / compilation, is
reported separately), then timed in interleaved rounds (round-robin over the variants, a few
steps each) so that machine noise hits every variant alike. Before timing, the clipped gradients
of the first step are compared with those of ``fx_bk eager`` (same weights, same batch).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fx_bk
from fx_bk.models import TinyTransformer, synthetic_token_task

FULL = dict(d=256, n_heads=4, n_layers=2, seq_len=128, batch=32, vocab=512)
QUICK = dict(d=128, n_heads=4, n_layers=1, seq_len=64, batch=16, vocab=512)
N_CLASSES = 4
BASELINE = "non-private compiled"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small size (d=128, T=64, 1 layer, batch 16); finishes in a few minutes")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default: 8, or 10 with --quick)")
    p.add_argument("--steps-per-round", type=int, default=3, help="timed steps per variant/round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first step")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    for k in FULL:  # size overrides
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- variants


class Variant:
    """One way of running a training step on its own copy of the model."""

    def __init__(self, name: str, model: nn.Module | None, step_fn):
        self.name = name
        self.model = model
        self.step_fn = step_fn  # (x, y, keep_grads=False) -> first-step grads or None
        self.times: list[float] = []
        self.first_step_s: float | None = None
        self.grad_check: float | None = None
        self.error: str | None = None


def _plain(name: str, model: nn.Module, compiled: bool, lr: float) -> Variant:
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(x, y, keep_grads=False):
        F.cross_entropy(fwd(x), y).backward()
        grads = _grads(model) if keep_grads else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    return Variant(name, model, step)


def _fx_bk(name: str, model: nn.Module, compiled: bool, lr: float, R: float) -> Variant:
    bk = fx_bk.transform(model, max_grad_norm=R)
    fwd = torch.compile(bk, fullgraph=True) if compiled else bk
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)

    def step(x, y, keep_grads=False):
        F.cross_entropy(fwd(x), y).backward()  # p.grad = sum_i C_i grad_i
        grads = _grads(model) if keep_grads else None
        with torch.no_grad():
            for p in params:
                p.grad.div_(x.shape[0])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grads

    return Variant(name, model, step)


def _opacus_ghost(name: str, model: nn.Module, lr: float, R: float, batch: int) -> Variant:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=R, use_ghost_clipping=True
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=R,
        expected_batch_size=batch, loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction="mean"), "mean")

    def step(x, y, keep_grads=False):
        loss = criterion(gsm(x), y)
        loss.backward()  # two passes; p.grad = sum_i C_i grad_i
        grads = _grads(model) if keep_grads else None
        opt.step()  # accumulate, (zero) noise, divide by expected_batch_size, SGD
        opt.zero_grad(set_to_none=True)
        return grads

    return Variant(name, gsm, step)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max_p ||a_p - b_p|| / max(||b_p||, tiny) over the parameters of b."""
    worst = 0.0
    for n, gb in b.items():
        ga = a.get(n, torch.zeros_like(gb))
        worst = max(worst, ((ga - gb).norm() / gb.norm().clamp_min(1e-12)).item())
    return worst


# --------------------------------------------------------------------------- helpers


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Opacus's hooks on a model whose input (token ids) needs no grad: harmless, once per step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    size = dict(QUICK if args.quick else FULL)
    for k in size:
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    rounds = args.rounds if args.rounds is not None else (10 if args.quick else 8)
    B, T, R = size["batch"], size["seq_len"], args.max_grad_norm

    torch.manual_seed(args.seed)
    base = TinyTransformer(vocab=size["vocab"], d=size["d"], n_heads=size["n_heads"],
                           n_layers=size["n_layers"], max_len=T, n_classes=N_CLASSES)
    x, y = synthetic_token_task(B, T, size["vocab"], N_CLASSES, seed=args.seed)  # [B, T], [B]
    n_params = sum(p.numel() for p in base.parameters())
    print(f"TinyTransformer d={size['d']} heads={size['n_heads']} layers={size['n_layers']} "
          f"T={T} batch={B} vocab={size['vocab']} params={n_params} R={R} | "
          f"{rounds} rounds x {args.steps_per_round} steps/variant", flush=True)

    builders = [
        ("non-private eager", lambda m: _plain("non-private eager", m, False, args.lr)),
        (BASELINE, lambda m: _plain(BASELINE, m, True, args.lr)),
        ("fx_bk eager", lambda m: _fx_bk("fx_bk eager", m, False, args.lr, R)),
        ("fx_bk compiled", lambda m: _fx_bk("fx_bk compiled", m, True, args.lr, R)),
        ("Opacus ghost", lambda m: _opacus_ghost("Opacus ghost", m, args.lr, R, B)),
    ]
    variants: list[Variant] = []
    for name, build in builders:
        try:
            v = build(copy.deepcopy(base))
        except Exception as e:  # noqa: BLE001 - a rejected variant is reported as n/a
            v = Variant(name, None, None)
            v.error = f"{type(e).__name__}: {e}".splitlines()[0]
        variants.append(v)

    # Warm-up: first step (tracing / compile) timed separately, its gradients kept for the check.
    first_grads: dict[str, dict] = {}
    for v in variants:
        if v.error:
            print(f"  {v.name:22s} n/a ({v.error})", flush=True)
            continue
        try:
            t0 = time.perf_counter()
            first_grads[v.name] = v.step_fn(x, y, keep_grads=True)
            v.first_step_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                v.step_fn(x, y)
        except Exception as e:  # noqa: BLE001
            v.error = f"{type(e).__name__}: {e}".splitlines()[0]
            v.first_step_s = None
        if v.error:
            print(f"  {v.name:22s} n/a ({v.error})", flush=True)
        else:
            print(f"  {v.name:22s} first step {v.first_step_s:.2f} s", flush=True)

    # Gradient check of the first step: DP variants vs fx_bk eager, compiled vs eager non-private.
    refs = {"non-private eager": ["non-private compiled"],
            "fx_bk eager": ["fx_bk compiled", "Opacus ghost"]}
    for ref, others in refs.items():
        for o in others:
            if ref in first_grads and o in first_grads:
                v = next(v for v in variants if v.name == o)
                v.grad_check = _rel_diff(first_grads[o], first_grads[ref])

    live = [v for v in variants if not v.error]
    for r in range(rounds):
        for v in live[r % len(live):] + live[:r % len(live)]:  # rotate who goes first
            for _ in range(args.steps_per_round):
                t0 = time.perf_counter()
                v.step_fn(x, y)
                v.times.append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds} done", flush=True)

    results = summarize(variants, size, args, rounds, n_params)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


def summarize(variants, size, args, rounds, n_params) -> dict:
    rows = {}
    for v in variants:
        ms = [1e3 * t for t in v.times]
        rows[v.name] = {
            "median_ms": statistics.median(ms) if ms else None,
            "p25_ms": _percentile(ms, 0.25) if ms else None,
            "p75_ms": _percentile(ms, 0.75) if ms else None,
            "first_step_s": v.first_step_s,
            "grad_check_rel_diff": v.grad_check,
            "n_steps": len(ms),
            "times_ms": ms,
            "error": v.error,
        }
    base = rows.get(BASELINE, {}).get("median_ms")
    for r in rows.values():
        r["vs_non_private_compiled"] = (
            r["median_ms"] / base if base and r["median_ms"] is not None else None
        )
    fx, op = rows["fx_bk compiled"]["median_ms"], rows["Opacus ghost"]["median_ms"]
    return {
        "config": {**size, "n_classes": N_CLASSES, "params": n_params, "rounds": rounds,
                   "steps_per_round": args.steps_per_round, "max_grad_norm": args.max_grad_norm,
                   "quick": args.quick},
        "machine": machine_info(),
        "variants": rows,
        "fx_bk_compiled_vs_opacus_ghost": fx / op if fx and op else None,
    }


def print_table(res: dict) -> None:
    m, c = res["machine"], res["config"]
    print()
    print(f"CPU: {m['cpu']} | threads: {m['threads']} | torch {m['torch']} | "
          f"python {m['python']}")
    print(f"d={c['d']} heads={c['n_heads']} layers={c['n_layers']} T={c['seq_len']} "
          f"batch={c['batch']} vocab={c['vocab']} params={c['params']} "
          f"({c['rounds']} rounds x {c['steps_per_round']} steps)")
    print()
    print(f"| variant | median ms | p25 ms | p75 ms | vs {BASELINE} | first step s "
          f"| grad rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in res["variants"].items():
        if r["error"]:
            print(f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        gc = r["grad_check_rel_diff"]
        print(f"| {name} | {_fmt(r['median_ms'])} | {_fmt(r['p25_ms'])} | {_fmt(r['p75_ms'])} "
              f"| {_fmt(r['vs_non_private_compiled'], '.2f')}x | {_fmt(r['first_step_s'], '.2f')} "
              f"| {'-' if gc is None else format(gc, '.1e')} |")
    ratio = res["fx_bk_compiled_vs_opacus_ghost"]
    print()
    print(f"fx_bk compiled / Opacus ghost (median): {_fmt(ratio, '.2f')}"
          + ("x" if ratio is not None else ""))
    print("grad rel diff: max over parameters of ||g - g_ref|| / ||g_ref|| at the first step "
          "(ref: non-private eager, or fx_bk eager for the DP variants)")


if __name__ == "__main__":
    main()
