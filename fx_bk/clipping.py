"""Per-sample norms -> clip factors -> clipped gradient sums, inside the joint graph."""

from __future__ import annotations

import torch

from .config import CLIP_EPS, BKConfig
from .rules import SiteValues, squared_norm, weighted_sum


def clip_factors(norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Abadi et al. / Opacus: ``C_i = min(1, R / (||grad_i|| + 1e-6))``."""
    return (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)


def _group_norm_sq(values: list[SiteValues], merged: bool):
    if merged:
        return values[0].site.rule.norm_sq(values)
    per_sample: dict[str, torch.Tensor] = {}
    for v in values:
        for name, g in v.site.rule.per_sample_grads(v).items():
            per_sample[name] = per_sample[name] + g if name in per_sample else g
    return sum(squared_norm(g) for g in per_sample.values()), per_sample


def _group_clipped(values: list[SiteValues], merged: bool, state, c: torch.Tensor):
    if merged:
        return values[0].site.rule.clipped_grads(values, state, c)
    return {name: weighted_sum(c, g) for name, g in state.items()}


def clipped_gradients(
    groups: list[tuple[list[SiteValues], bool]],
    config: BKConfig,
    batch,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Return ``{param: sum_i C_i grad_i}`` and the per-sample norms ``[B]``.

    ``groups``: (site values, merged) per parameter group. The ``g`` in the site values is
    ``dL/ds``; with ``loss_reduction="mean"`` it carries ``1/B``, so per-sample gradients are
    ``B *`` the ones computed from it.
    """
    scale = batch if config.loss_reduction == "mean" else 1
    total = None
    states = []
    for values, merged in groups:
        norm_sq, state = _group_norm_sq(values, merged)
        states.append(state)
        total = norm_sq if total is None else total + norm_sq
    norm = total.sqrt() * scale  # [B]
    c = clip_factors(norm, config.max_grad_norm) * scale
    grads: dict[str, torch.Tensor] = {}
    for (values, merged), state in zip(groups, states):
        grads.update(_group_clipped(values, merged, state, c))
    return grads, norm
