"""Worst oracle error per test model: ``python -m benchmarks.oracle_errors``.

For every model of ``tests/models.py``: max over B in {1, 7, 32}, R in {1e-3, 1e3}, mean/sum and
parameters of ``max|a - b| / max|b|``, fx_bk (eager, compiled) vs the vmap per-sample oracle, and
vs Opacus 1.6 ghost clipping where Opacus supports the model. Prints a markdown table.
"""

from __future__ import annotations

import torch

import fx_bk
from fx_bk.testing import fx_bk_grads, max_rel_err, opacus_clipped_sum, vmap_clipped_sum
from fx_bk.testing.models import MODELS, OPACUS_MODELS, batch_for


def worst(name: str, dtype, compiled: bool, oracle: str) -> float:
    out = 0.0
    for reduction in ("mean", "sum"):
        for norm in (1e-3, 1e3):
            torch.compiler.reset()
            torch.manual_seed(0)
            model = MODELS[name]().to(dtype)
            bk = fx_bk.transform(model, max_grad_norm=norm, loss_reduction=reduction)
            if compiled:
                bk = torch.compile(bk, fullgraph=True)
            for b in (1, 7, 32):
                x, y = batch_for(name, model, b, seed=b, dtype=dtype, padding=oracle == "vmap")
                got = fx_bk_grads(bk, model, x, y, reduction)
                ref = (vmap_clipped_sum(model, x, y, norm) if oracle == "vmap"
                       else opacus_clipped_sum(model, x, y, norm, reduction))
                out = max(out, max_rel_err(got, ref))
    return out


def main() -> None:
    torch.set_num_threads(2)
    rows = ["| model | f32 eager vs vmap | f32 compiled vs vmap | f64 eager vs vmap | "
            "f32 vs Opacus | f64 vs Opacus |", "|---|---|---|---|---|---|"]
    for name in MODELS:
        cells = [worst(name, torch.float32, False, "vmap"),
                 worst(name, torch.float32, True, "vmap"),
                 worst(name, torch.float64, False, "vmap")]
        if name in OPACUS_MODELS:
            cells += [worst(name, torch.float32, False, "opacus"),
                      worst(name, torch.float64, False, "opacus")]
        text = [f"{c:.1e}" for c in cells] + ["n/a (Opacus fails)"] * (5 - len(cells))
        rows.append(f"| {name} | " + " | ".join(text) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
