"""Per-sample norms -> clip factors -> clipped gradient sums, inside the joint graph."""

from __future__ import annotations

import torch

from .config import AUTOMATIC_GAMMA, CLIP_EPS, BKConfig
from .rules import BundleHandler, Rule
from .rules.pool import GradientPool, pooling
from .site import SiteValues


def clip_factors(norm: torch.Tensor, max_grad_norm, clipping: str = "abadi"):
    """``C_i`` from the per-sample norms ``[B]`` (see ``BKConfig.clipping``); ``max_grad_norm``
    is a number or a 0-dim tensor (the module's current bound, ``BKModule.clip_bounds``)."""
    if clipping == "abadi":  # Abadi et al. / Opacus
        return (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    if clipping == "automatic":  # Bu et al., automatic clipping
        return max_grad_norm / (norm + AUTOMATIC_GAMMA)
    if clipping == "global":
        return (norm <= max_grad_norm).to(norm.dtype)
    raise ValueError(f"unknown clipping {clipping!r}")


def clipped_gradients(
    bundles: list[tuple[list[SiteValues], BundleHandler, int]],
    config: BKConfig,
    batch,
    bounds: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Return ``{param: sum_i C_i grad_i}`` and the per-sample norms ``[B, K]`` (K clipping
    groups; K = 1 for all-layer clipping).

    ``bounds``: the clipping bounds ``[K]`` (float64), an input of the backward graph rather
    than a constant in it, so that a new bound (adaptive clipping) needs no new trace.

    ``bundles``: (site values, handler, clipping group) per bundle of sites sharing parameters
    (see ``fx_bk.rules.bundle_handler``). The ``g`` in the site values is ``dL/ds``; with
    ``loss_reduction="mean"`` it carries ``1/B``, so per-sample gradients are ``B *`` the ones
    computed from it. Norms and clip factors are float32 at least.
    """
    scale = batch if config.loss_reduction == "mean" else 1
    totals: list = [None] * len(config.group_bounds)
    # a rule's own bundles pool their small per-sample gradients per group (fx_bk/rules/pool.py)
    pools = [GradientPool() for _ in totals]

    def pool_of(handler, k):
        return pools[k] if isinstance(handler, Rule) else None

    states = []
    for values, handler, k in bundles:
        with pooling(pool_of(handler, k)):
            norm_sq, state = handler.norm_sq(values)
        states.append(state)
        totals[k] = norm_sq if totals[k] is None else totals[k] + norm_sq
    for k, pool in enumerate(pools):
        pooled = pool.norm_sq()
        if pooled is not None:
            totals[k] = pooled if totals[k] is None else totals[k] + pooled
    ref = next(t for t in totals if isinstance(t, torch.Tensor))
    norms = torch.stack([
        (t if t is not None else torch.zeros_like(ref)).sqrt() * scale for t in totals
    ], dim=1)  # [B, K]
    c = torch.stack([
        clip_factors(norms[:, k], bounds[k].to(norms.dtype), config.clipping)
        for k in range(len(totals))
    ], dim=1) * scale
    finite = torch.isfinite(norms).all(1)  # a NaN/Inf sample contributes exactly zero:
    c = torch.where(finite[:, None], c, 0.0)  # C = 0; the rules' clipped sums add exactly
    # zero for it (fx_bk.rules.scale_samples / keep_samples / weighted_sum: 0 * NaN is NaN)
    for k, pool in enumerate(pools):
        pool.c = c[:, k]
    grads: dict[str, torch.Tensor] = {}
    for (values, handler, k), state in zip(bundles, states):
        with pooling(pool_of(handler, k)):
            grads.update(handler.clipped_grads(values, state, pools[k].c))
    return grads, norms
