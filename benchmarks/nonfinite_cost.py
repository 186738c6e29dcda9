"""What skipping non-finite samples costs: fx_bk compiled with and without the masking.

A sample whose norm is NaN/Inf gets ``C = 0`` and its values are zeroed where the clipped sums
read them (``fx_bk.rules.scale_samples`` / ``keep_samples`` / ``weighted_sum`` in the graph, where
the mask on a scaled tensor fuses into its scaling; inside ``fx_bk::clipped_gemm`` and
``fx_bk::clipped_conv_weight_grad``, a Linear or convolution site's clipped weight gradient, on
CPU only when some ``C_i`` is zero). This script builds each benchmark model twice, once with
those helpers and ops replaced by the plain products (no masking; NaN-unsafe), and times both in one
process, interleaved, rotating who goes first. Printed: median step (ms) of each and the ratio
masked / plain, median over rounds.

    python -m benchmarks.nonfinite_cost [--quick] [--models mlp encoder] [--rounds 15]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import fx_bk
from fx_bk.kernels.clipped_gemm import scale_goes_to_g
from fx_bk.rules import base, conv, embedding, linear, pool, sample_math

from .bench_models import bench_models


def _plain_scale(c, t):
    return t * c.to(t.dtype).reshape(-1, *[1] * (t.dim() - 1))


def _plain_sum(c, t):
    return torch.tensordot(c.to(t.dtype), t, dims=1)


def _plain_smaller(x, g, c):
    """The clip factors on the operand the ops scale (``scale_goes_to_g``), unmasked."""
    return (x, _plain_scale(c, g)) if scale_goes_to_g(x, g) else (_plain_scale(c, x), g)


def _plain_gemm(a, g, c, transposed):
    a, g = _plain_smaller(a, g, c)
    a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return a.t() @ g if transposed else g.t() @ a


def _plain_conv(x, g, c, weight_shape, *geometry):
    x, g = _plain_smaller(x, g, c)
    weight = g.new_empty(1).expand(weight_shape)
    return torch.ops.aten.convolution_backward(g, x, weight, None, *geometry,
                                               [False, True, False])[1]


@contextlib.contextmanager
def unmasked():
    """The rules' NaN-safe helpers replaced by plain products while a program is traced."""
    saved = []
    for mod in (sample_math, pool, base, conv, embedding, linear):
        for name, plain in (("scale_samples", _plain_scale), ("keep_samples", lambda c, t: t),
                            ("weighted_sum", _plain_sum), ("clipped_gemm", _plain_gemm),
                            ("clipped_conv_weight_grad", _plain_conv)):
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, plain)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _stepper(bm, masked: bool):
    model = bm.build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    run = torch.compile(fx_bk.transform(model, max_grad_norm=1.0), fullgraph=True)
    x, y = bm.batch(0)

    def step():
        opt.zero_grad(set_to_none=True)
        bm.per_sample_loss(run(x), y).mean().backward()
        opt.step()

    with contextlib.nullcontext() if masked else unmasked():
        step()  # traces and compiles under the chosen helpers
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = bench_models(args.quick, False)
    print(f"| model | masked (ms) | plain (ms) | masked / plain, median [p25, p75] over "
          f"{args.rounds} rounds |\n|---|---|---|---|")
    for name in args.models or list(models):
        bm = models[name]
        steps = {"masked": _stepper(bm, True), "plain": _stepper(bm, False)}
        for s in steps.values():
            s()
        times: dict[str, list[float]] = {k: [] for k in steps}
        ratios = []
        for r in range(args.rounds):
            order = list(steps) if r % 2 == 0 else list(steps)[::-1]
            med = {}
            for k in order:
                ts = []
                for _ in range(args.steps_per_round):
                    t0 = time.perf_counter()
                    steps[k]()
                    ts.append(time.perf_counter() - t0)
                times[k] += ts
                med[k] = statistics.median(ts)
            ratios.append(med["masked"] / med["plain"])
        q = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {1e3 * statistics.median(times['masked']):.2f} | "
              f"{1e3 * statistics.median(times['plain']):.2f} | "
              f"{statistics.median(ratios):.3f} [{q[0]:.3f}, {q[2]:.3f}] |")


if __name__ == "__main__":
    main()
