"""What is alive at the tensor peak of fx_bk's compiled step, against the non-private one (CPU).

``python -m benchmarks.memory_peak [--models mlp encoder gpt2 cnn] [--quick] [--top N]
[--json PATH]``

Per model, non-private compiled and fx_bk compiled from the same weights and batch (the
variants of ``benchmarks.step``), a few steps each, then one step under ``torch.profiler``
with ``profile_memory=True``. Its allocation events, in time order, give the running sum of
tensor bytes allocated during the step; at its maximum (the transient peak, as
``benchmarks.memory.tensor_peak`` measures it) every allocation not yet freed is listed with the
ops that made it (the allocating op and its parents). Each goes to one category by the first
of its parents that says where it was made:

* inside one of fx_bk's opaque ops (``fx_bk::...``): that op (its output or a temporary of its
  own, such as a per-sample convolution's padded copies);
* in the compiled forward: ``forward`` (what the backward saved of it, and the forward's
  convolutions' outputs it reads);
* in the compiled backward: ``backward`` (output and input gradients, the clip stage's
  buffers, the backward's convolutions' outputs);
* anything else (the loss, the optimizer): ``other``.

Printed per model: both variants' transient peaks, the op running at each, and the table of
bytes alive at the peak per category with the difference; ``--top`` lists fx_bk's largest live
allocations one by one. The parameters, grads, optimizer state and batch, alive throughout,
are not in these sums (``benchmarks.memory`` adds them for its ratio).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from benchmarks.bench_models import bench_models
from benchmarks.report import model_parser, run_models
from benchmarks.variants import BASELINE, PRIVATE, compiled_pair

MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = model_parser(__doc__)
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled one")
    p.add_argument("--top", type=int, default=12, help="fx_bk's largest live allocations listed")
    return p.parse_args(argv)


def category(chain: list[str]) -> str:
    """The category of an allocation from the names of the op that made it and its parents,
    innermost first (see the module docstring)."""
    for name in chain:
        if name.startswith("fx_bk::"):
            return name
    for name in chain:
        if name == "CompiledFunctionBackward":
            return "backward"
        if name == "CompiledFunction":
            return "forward"
    return "other"


def _short(name: str) -> str:
    return "Inductor's code" if name.startswith("## Call CompiledFxGraph") else name


def allocations(prof) -> list[tuple[int, int, int, list[str]]]:
    """``(time ns, address, signed bytes, op chain innermost first)`` of a profile's CPU
    allocator events in time order (frees have negative bytes)."""
    from torch._C._profiler import _EventType

    out = []
    stack = [(node, []) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, parents = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            fields = node.typed[1]
            if fields.device.type == "cpu":
                out.append((node.start_time_ns, fields.ptr, fields.alloc_size, parents))
            continue
        chain = [node.name, *parents]
        stack.extend((child, chain) for child in node.children)
    out.sort(key=lambda e: e[0])
    return out


def peak_contents(events) -> dict:
    """The transient peak of ``allocations(...)`` and what is alive there: bytes per category,
    the op that allocated last before it, and the live allocations largest first."""
    live: dict[int, tuple[int, list[str]]] = {}
    cur = peak = 0
    at_peak: dict[int, tuple[int, list[str]]] = {}
    running = ""
    for _, ptr, size, chain in events:
        cur += size
        if size > 0:
            live[ptr] = (size, chain)
        else:
            live.pop(ptr, None)
        if cur > peak:
            peak, at_peak = cur, dict(live)
            running = f"{_short(chain[0])} in {category(chain)}" if chain else "?"
    by_cat: dict[str, int] = defaultdict(int)
    for size, chain in at_peak.values():
        by_cat[category(chain)] += size
    largest = sorted(((size, f"{category(chain)}: " + " < ".join(map(_short, chain[:2])))
                      for size, chain in at_peak.values()), reverse=True)
    return {"peak_bytes": peak, "running": running, "by_category": dict(by_cat),
            "largest": largest}


def profile_step(v, x, y) -> list:
    """The allocations of one step of variant ``v``."""
    with torch.profiler.profile(profile_memory=True) as prof:
        v.step_fn(x, y)
    return allocations(prof)


def run_model(bm, args) -> dict:
    _, x, y, variants = compiled_pair(bm)
    res = {"model": bm.name, "describe": bm.describe(), "variants": {}}
    for name, v in variants.items():
        for _ in range(args.warmup):
            v.step_fn(x, y)
        res["variants"][name] = peak_contents(profile_step(v, x, y))
    return res


def report(res: dict, top: int) -> str:
    base, priv = (res["variants"][k] for k in (BASELINE, PRIVATE))
    lines = [f"### {res['model']} ({res['describe']})", "",
             f"transient tensor peak: non-private {base['peak_bytes'] / MIB:.1f} MiB (while "
             f"{base['running']}), fx_bk {priv['peak_bytes'] / MIB:.1f} MiB (while "
             f"{priv['running']})", "",
             "| alive at the peak | non-private MiB | fx_bk MiB | difference MiB |",
             "|---|---:|---:|---:|"]
    cats = sorted(set(base["by_category"]) | set(priv["by_category"]),
                  key=lambda c: -(priv["by_category"].get(c, 0) - base["by_category"].get(c, 0)))
    for c in cats:
        b, p = base["by_category"].get(c, 0) / MIB, priv["by_category"].get(c, 0) / MIB
        if max(b, p) < 0.05:
            continue
        lines.append(f"| {c} | {b:.1f} | {p:.1f} | {p - b:+.1f} |")
    if top:
        lines += ["", f"fx_bk's {top} largest live allocations (MiB, category: op < parent):"]
        lines += [f"  {size / MIB:7.2f}  {where}" for size, where in priv["largest"][:top]]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    models = bench_models(args.quick, False)
    return run_models(args.models, lambda name: run_model(models[name], args),
                      lambda res: report(res, args.top), args.threads, args.json)


if __name__ == "__main__":
    main()
