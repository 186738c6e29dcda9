"""Check fx_bk on your own model in one call, against an explicit per-sample oracle.

    import fx_bk.testing
    err = fx_bk.testing.assert_matches_per_sample(
        model, torch.nn.functional.cross_entropy, (x, y), max_grad_norm=1.0)

The oracles fx_bk's own tests use are here too (``oracles.py``), and small reference models
(``models.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .oracles import (
    clip_factor,
    fx_bk_grads,
    loop_clipped_sum,
    max_rel_err,
    opacus_clipped_sum,
    per_sample_grads,
    rel_err,
    trainable,
    vmap_clipped_sum,
)

__all__ = [
    "assert_matches_per_sample",
    "clip_factor",
    "fx_bk_grads",
    "loop_clipped_sum",
    "max_rel_err",
    "opacus_clipped_sum",
    "per_sample_grads",
    "rel_err",
    "vmap_clipped_sum",
]

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_matches_per_sample(
    model: torch.nn.Module,
    loss_fn: Callable,
    batch: tuple,
    *,
    max_grad_norm: float = 1.0,
    loss_reduction: str = "mean",
    clipping: str = "abadi",
    compile: bool = False,
    tol: float | None = None,
) -> float:
    """Train-step ``model`` once through ``fx_bk.transform`` and compare every ``p.grad`` with
    ``sum_i C_i grad l_i`` computed one sample at a time; return the error, raise
    ``AssertionError`` when it exceeds ``tol``.

    ``batch = (inputs, target)``: ``inputs`` a tensor or a tuple of positional tensors (batch
    first), ``target`` a tensor (batch first) or None. ``loss_fn(output, target)`` is the
    training loss, reduced over the batch by ``loss_reduction``; the oracle calls it on each
    sample alone (``model(*inputs[i:i+1])``). Put the model in ``eval()`` mode if it has
    dropout (the oracle's forward would draw other masks). Error metric: the worst parameter's
    ``max|fx_bk - oracle| / max|oracle|``; ``tol`` defaults to 1e-10 in float64, 1e-5 in
    float32. ``compile=True`` runs ``torch.compile(fullgraph=True)`` on the fx_bk module.
    ``p.grad`` is left as fx_bk computed it.
    """
    import fx_bk

    inputs, target = batch
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    bk = fx_bk.transform(model, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                         clipping=clipping)
    step = torch.compile(bk, fullgraph=True) if compile else bk
    model.zero_grad(set_to_none=True)
    loss_fn(step(*inputs), target).backward()
    got = {n: p.grad.detach().clone() for n, p in trainable(model)}
    model.zero_grad(set_to_none=True)

    b, n_in = inputs[0].shape[0], len(inputs)
    batched_target = isinstance(target, torch.Tensor) and target.dim() > 0 \
        and target.shape[0] == b

    def one_sample(m, rows):  # rows: every batched tensor of the batch, sliced [i:i+1]
        return loss_fn(m(*rows[:n_in]), rows[n_in] if batched_target else target)

    sliced = (*inputs, target) if batched_target else inputs
    ref = loop_clipped_sum(model, sliced, None, max_grad_norm, loss_of=one_sample,
                           clipping=clipping)
    for n, p in trainable(model):
        p.grad = got[n]
    err = max_rel_err(got, ref)
    dtype = next(p for _, p in trainable(model)).dtype
    limit = tol if tol is not None else DEFAULT_TOL.get(dtype, 1e-2)
    if not err <= limit:
        raise AssertionError(
            f"fx_bk's clipped gradient differs from the per-sample oracle on "
            f"{type(model).__name__}: max relative error {err:.3e} > {limit:.1e} "
            f"(B={b}, max_grad_norm={max_grad_norm}, {dtype})"
        )
    return err
