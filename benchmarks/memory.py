"""Peak memory of a training step, one fresh process per (model, variant); never while timing.

``add_memory`` starts one ``python -m benchmarks.step --memory-server`` process, which imports
torch, fx_bk and Opacus once and forks one child per (model, variant) (on CUDA: one process per
job, no fork). A child runs only that variant for a few steps, then one more step under
``torch.profiler`` (``profile_memory=True``). Peak memory, the headline: on CPU the tensor peak
(``tensor_peak``), the analogue of ``torch.cuda.max_memory_allocated``: the peak of the running
sum of that step's allocator events plus the bytes alive before it that training holds
(parameters, their grads, optimizer state, the batch); on CUDA ``torch.cuda.max_memory_allocated``.
Also: the peak RSS (VmHWM, compilation and the tracer's Python heap included) minus the RSS
before the model is built, and the peak RSS of the steady steps after the first (reset through
``/proc/self/clear_refs`` where the kernel allows). Ratios are to the baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.bench_models import LONG_NAMES, bench_models
from benchmarks.report import fmt
from benchmarks.variants import BASELINE, Variant, build_variant, reason, sync

REPO = Path(__file__).resolve().parent.parent


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
        sync(device)
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
    bm = bench_models(args.quick, args.long or model_name in LONG_NAMES, vocab=args.vocab,
                      batch=args.batch)[model_name]
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
        sync(args.device)
        first_hwm = _hwm_mb()
        reset = _reset_hwm()
        if cuda:
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        for _ in range(max(args.memory_steps - 1, 1)):
            v.step_fn(x, y)
        sync(args.device)
    except Exception as e:  # noqa: BLE001
        return {**out, "error": reason(e)}
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
        out["tensor_peak_error"] = reason(e)
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
    if args.warm_caches:
        argv.append("--warm-caches")
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
                    res = {"error": reason(e)}
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
            print(f"  memory {model:12s} {variant:22s} {fmt(mem['peak_mb'], '9.1f')} MB, "
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
