"""Per-sample norms -> clip factors -> clipped gradient sums, inside the joint graph."""

from __future__ import annotations

import torch

from .config import CLIP_EPS, BKConfig
from .rules import SiteValues


def clip_factors(norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Abadi et al. / Opacus: ``C_i = min(1, R / (||grad_i|| + 1e-6))``."""
    return (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)


def clipped_gradients(
    groups: list[tuple[list[SiteValues], object]],
    config: BKConfig,
    batch,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Return ``{param: sum_i C_i grad_i}`` and the per-sample norms ``[B]``.

    ``groups``: (site values, handler) per parameter group (see ``rules.group_handler``).
    The ``g`` in the site values is ``dL/ds``; with ``loss_reduction="mean"`` it carries
    ``1/B``, so per-sample gradients are ``B *`` the ones computed from it.
    """
    scale = batch if config.loss_reduction == "mean" else 1
    total = None
    states = []
    for values, handler in groups:
        norm_sq, state = handler.norm_sq(values)
        states.append(state)
        total = norm_sq if total is None else total + norm_sq
    norm = total.sqrt() * scale  # [B]
    c = clip_factors(norm, config.max_grad_norm) * scale
    grads: dict[str, torch.Tensor] = {}
    for (values, handler), state in zip(groups, states):
        grads.update(handler.clipped_grads(values, state, c))
    return grads, norm
