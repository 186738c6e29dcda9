"""Where fx_bk's compiled step spends its time, for one model, on a GPU (or the CPU).

``python -m benchmarks.gpu_profile --model encoder [--quick] [--device cuda] [--json PATH]``

One model's non-private compiled step against fx_bk's, interleaved rounds, median ms and ratios,
then the same compiled fx_bk step with a part of the opaque ghost-norm op swapped at run time
(the op's body runs in Python at every call, so the swap needs no recompile; each swap is timed
on the same compiled program):

* ``guard as bound``: the rounding guard's recomputation of cancelling samples (a ``nonzero``
  over the batch: one host sync per ghost-norm site on CUDA) replaced by the in-graph bound of
  ``rounding_bound.guard_norm_sq`` (no sync; still a valid bound, it over-clips only cancelling
  samples): what the sync costs;
* ``no host sync``: that, and the step guard's check of non-finite norms (a ``nonzero`` read on
  the host, once per step) skipped: every host sync of the step gone (the clipping still zeroes
  non-finite samples; only their warning is lost): what all syncs cost;
* ``ghost norm in PyTorch``: the Triton kernel replaced by the blocked PyTorch implementation
  (``bmm`` per block row): what the kernel gains or loses.

Then one profiled fx_bk step (``torch.profiler``): the device's busy time against the step's
wall time, the calls that wait for the device (``nonzero``, ``item``, stream synchronizations),
and the 15 kernels with the most device time. One prepared call for a lent GPU (the numbers are
the next profile's starting point, not a benchmark result).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from unittest import mock

import torch

import fx_bk
import fx_bk.kernels.ghost_norm as ghost_norm_module
import fx_bk.step_guard as step_guard_module
from benchmarks.bench_models import MODEL_NAMES, bench_models
from benchmarks.variants import ieee_float32, sync
from fx_bk.kernels.rounding_bound import guard_norm_sq


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODEL_NAMES, default="encoder")
    p.add_argument("--quick", action="store_true", help="the quick sizes of benchmarks.step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, metavar="PATH")
    return p.parse_args(argv)


def guard_as_bound():
    """The ghost-norm op's cancelling samples bounded in place (no host sync)."""

    def bound(norm_sq, bound, exact, positions, length, error=None):
        return guard_norm_sq(norm_sq, bound, norm_sq.dtype, length)

    return mock.patch.object(ghost_norm_module, "recompute_cancelling", bound)


@contextlib.contextmanager
def no_host_sync():
    """``guard_as_bound`` and no host-side check of the norms' finiteness."""
    with guard_as_bound(), mock.patch.object(step_guard_module, "_check_finite",
                                             lambda norms, key, raise_nonfinite: None):
        yield


def ghost_norm_in_pytorch():
    """The blocked PyTorch ghost norm instead of the Triton kernel."""
    return mock.patch.object(ghost_norm_module, "_triton_available", lambda: False)


def _stepper(bm, module, params, device):
    """One SGD step of ``module`` (compiled, fullgraph) on the model's batch 0."""
    x, y = (t.to(device) for t in bm.batch(0))
    fwd = torch.compile(module, fullgraph=True)
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        bm.per_sample_loss(fwd(x), y).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _time(step, n: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / n


def _profile(step, device: str) -> dict:
    """One profiled step: device busy time, waiting calls, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    step()
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        sync(device)
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    waits = {e.key: e.count for e in events
             if any(w in e.key for w in ("nonzero", "aten::item", "Synchronize", "local_scalar"))}
    if device.startswith("cuda"):
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
        rows = [(e.key[:90], e.count, e.self_device_time_total / 1e3) for e in top]
    else:
        busy = None
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
        rows = [(e.key[:90], e.count, e.self_cpu_time_total / 1e3) for e in top]
    return {"wall_ms": wall, "device_busy_ms": busy, "waits": waits, "top": rows}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    ieee_float32(args.device)
    bm = bench_models(args.quick, False)[args.model]
    torch.manual_seed(0)
    base = bm.build().to(args.device)
    private = bm.build().to(args.device)
    private.load_state_dict(base.state_dict())
    steps = {
        "non-private compiled": _stepper(bm, base, base.parameters(), args.device),
        "fx_bk compiled": _stepper(bm, fx_bk.transform(private, max_grad_norm=1.0),
                                   private.parameters(), args.device),
    }
    swaps = {"fx_bk compiled": contextlib.nullcontext, "guard as bound": guard_as_bound,
             "no host sync": no_host_sync, "ghost norm in PyTorch": ghost_norm_in_pytorch}
    variants = {"non-private compiled": (steps["non-private compiled"], contextlib.nullcontext)}
    variants.update({name: (steps["fx_bk compiled"], swap) for name, swap in swaps.items()})
    for step, swap in variants.values():  # compile, warm up
        with swap():
            step()
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (step, swap) in variants.items():
            with swap():
                times[name].append(_time(step, args.steps, args.device))
    base_ms = statistics.median(times["non-private compiled"])
    result = {"model": args.model, "quick": args.quick, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "median_ms": {}, "ratio": {}}
    print(f"{args.model} ({bm.describe()}) on {result['gpu'] or args.device}, torch "
          f"{torch.__version__}, {args.rounds} rounds x {args.steps} steps")
    print("| variant | median ms | vs non-private compiled |\n|---|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        result["median_ms"][name], result["ratio"][name] = ms, ms / base_ms
        print(f"| {name} | {ms:.2f} | {ms / base_ms:.2f}x |")
    prof = _profile(steps["fx_bk compiled"], args.device)
    result["profile"] = prof
    busy = prof["device_busy_ms"]
    print(f"\nprofiled fx_bk step: wall {prof['wall_ms']:.2f} ms"
          + ("" if busy is None else f", device busy {busy:.2f} ms "
             f"({100 * busy / prof['wall_ms']:.0f}%)"))
    print(f"calls that wait for the device: {prof['waits'] or 'none'}")
    print("| kernel / op | calls | self ms |\n|---|---:|---:|")
    for key, count, ms in prof["top"]:
        print(f"| {key} | {count} | {ms:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
