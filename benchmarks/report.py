"""The benchmark's report: machine description, markdown table and bar chart of the ratios."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from benchmarks.bench_models import MODEL_NAMES
from benchmarks.variants import AUTOCAST_VARIANTS, BASELINE, VARIANTS


def malloc_settings() -> str:
    """glibc's malloc tunables set in the environment, or that there are none. They decide how
    often a freed tensor's pages go back to the kernel, and so how many page faults the steps
    take (docs/benchmarks.md, "Page faults")."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "default malloc settings"


def model_parser(doc: str) -> argparse.ArgumentParser:
    """The profiling tools' shared options: ``--models``, ``--quick``, ``--threads``, ``--json``
    (the description: ``doc``'s first paragraph)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--quick", action="store_true", help="the quick sizes of benchmarks.step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, metavar="PATH")
    return p


def run_models(names, run, describe, threads: int, json_path: str | None) -> list[dict]:
    """``run(name)`` for each model name with ``threads`` torch threads (the count restored
    afterwards), each result's ``describe(result)`` printed as it comes; the list of results,
    also written to ``json_path`` when given."""
    results = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in names:
            results.append(run(name))
            print(describe(results[-1]) + "\n", flush=True)
    finally:
        torch.set_num_threads(before)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


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
        "inductor_caches_disabled": torch.compiler.config.force_disable_caches,
        "malloc": malloc_settings(),
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


def fmt(v, spec: str = ".1f", suffix: str = "") -> str:
    """``v`` formatted by ``spec`` plus ``suffix``; "n/a" for None."""
    return "n/a" if v is None else format(v, spec) + suffix


def table(results: dict) -> str:
    m = results["machine"]
    cuda = m["device"].startswith("cuda")
    lines = [
        f"Machine: {m['cpu']} (platform.processor: {m['processor'] or '?'}) | "
        f"{m['cpu_count']} CPUs | {m['threads']} threads | device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"torch {m['torch']} | opacus {m.get('opacus', '?')} | python {m['python']} | "
        f"{m.get('malloc', '?')} | {m['date']}",
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
    amp = any("fx_bk compiled bf16" in res["variants"] for res in results["models"].values())
    summary = ["", "| model | arithmetic floor | fx_bk compiled | fx_bk eager | Opacus ghost "
               "| Opacus hooks | Opacus ghost / fx_bk compiled | first call s (÷ non-private) "
               "| of which fx_bk passes s |"
               + (" bf16: fx_bk ÷ non-private [p25, p75] | bf16 grad rel diff fx_bk "
                  "[non-private] |" if amp else ""),
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if amp else "")]
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
                mem_s = fmt(mem["peak_mb"]) + (
                    f" [{fmt(mem['steady_mb'])}]" if mem.get("steady_mb") is not None else "")
                rss_s = (f"{mem['rss_delta_mb']:.0f} "
                         f"[{fmt(mem.get('rss_steady_delta_mb'), '.0f')}]")
            gc_ = r["grad_check_rel_diff"]
            bold = "**" if name == "fx_bk compiled" else ""
            lines.append(
                f"| {model} | {name} | {fmt(r['median_ms'])} | {fmt(r['p25_ms'])} "
                f"| {fmt(r['p75_ms'])} | {bold}{fmt(r['ratio'], '.2f', 'x')}{bold} "
                f"[{fmt(r['ratio_p25'], '.2f')}, {fmt(r['ratio_p75'], '.2f')}] "
                f"| {fmt(r['first_step_s'], '.2f')} | {mem_s} "
                f"| {fmt(r.get('memory_ratio'), '.2f', 'x') if mem else '-'} | {rss_s} "
                f"| {fmt(r.get('rss_ratio'), '.2f', 'x') if mem else '-'} "
                f"| {'-' if gc_ is None else format(gc_, '.1e')} |")
        fl = res["floor"] or {}
        floor_s = (f"n/a ({fl['error']})" if "error" in fl else "n/a" if not fl else
                   f"{fl['bk_flops'] / 1e9:.4g}/{fl['base_flops'] / 1e9:.4g} GFLOP "
                   f"= {fl['floor']:.3f}")

        def ratio(name, rows=rows):
            r = rows.get(name)
            if r is None:
                return "-"
            return f"n/a ({r['error'][:40]})" if r["error"] else fmt(r["ratio"], ".2f", "x")

        fx, gh = rows.get("fx_bk compiled", {}), rows.get("Opacus ghost", {})
        speed = (gh["median_ms"] / fx["median_ms"]
                 if fx.get("median_ms") and gh.get("median_ms") else None)
        first = (f"{fmt(fx.get('first_step_s'), '.1f')} "
                 f"({fmt(fx.get('first_step_ratio'), '.2f', 'x')})" if fx else "-")
        summary.append(f"| {model} | {floor_s} | {ratio('fx_bk compiled')} "
                       f"| {ratio('fx_bk eager')} | {ratio('Opacus ghost')} "
                       f"| {ratio('Opacus hooks')} | {fmt(speed, '.2f', 'x')} | {first} "
                       f"| {fmt(fx.get('fx_bk_passes_s'), '.1f')} |"
                       + (_amp_cells(rows) if amp else ""))
    lines += summary
    lines += ["", "Ratios are step time / non-private compiled. Floor: counted FLOPs of one fx_bk "
              "step over those of the non-private step (FlopCounterMode, eager forward + loss + "
              "backward; matmul-like ops, convolutions, attention, fx_bk::ghost_norm). "
              "grad rel diff: max over parameters of ||g - g_ref|| / ||g_ref|| of the first "
              "step's clipped sum (ref: fx_bk eager; non-private eager for non-private compiled). "
              "First call: fx_bk compiled's first step (trace + fx_bk passes + Dynamo / "
              "AOTAutograd / Inductor + the step), "
              + ("cold (every compilation with empty Inductor caches)"
                 if results["config"].get("cold_caches") else "with Inductor's caches (warm)")
              + ", ÷ non-private compiled's first step; of which fx_bk passes: the fx_bk "
              "graph passes' own time (trace, analysis, joint graph, partition)."
              + (" bf16: forward under torch.autocast(bfloat16), loss and backward outside; "
                 "step-time ratio per round of fx_bk compiled bf16 / non-private compiled bf16; "
                 "grad rel diff vs the float32 eager variant of the same kind." if amp else "")]
    return "\n".join(lines)


def _amp_cells(rows: dict) -> str:
    """The bf16 columns of one model: fx_bk bf16 / non-private bf16 step time, and each one's
    first-step gradient difference from its float32 eager counterpart."""
    fx, np_ = rows.get("fx_bk compiled bf16", {}), rows.get("non-private compiled bf16", {})
    if fx.get("error") or np_.get("error"):
        return f" n/a ({(fx.get('error') or np_.get('error'))[:40]}) | - |"

    def err(r):
        return "n/a" if r.get("grad_check_rel_diff") is None else (
            format(r["grad_check_rel_diff"], ".1e"))

    return (f" {fmt(fx.get('pair_ratio'), '.2f', 'x')} [{fmt(fx.get('pair_ratio_p25'), '.2f')}, "
            f"{fmt(fx.get('pair_ratio_p75'), '.2f')}] | {err(fx)} [{err(np_)}] |")


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return False
    models = list(results["models"])
    names = [v for v in VARIANTS + AUTOCAST_VARIANTS
             if any(v in r["variants"] for r in results["models"].values())]
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
