"""The frozen configuration of one ``fx_bk.transform`` call."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

LOSS_REDUCTIONS = ("mean", "sum")
CLIP_EPS = 1e-6  # C_i = min(1, R / (||grad_i|| + CLIP_EPS)), Opacus's formula


@dataclass(frozen=True)
class BKConfig:
    """Book-Keeping DP-SGD settings.

    max_grad_norm: the clipping bound R on each sample's gradient (L2 over all trainable params).
    loss_reduction: how the user's loss combines per-sample losses: "mean" (the loss is
        ``mean_i l_i``) or "sum". Either way ``p.grad`` receives the clipped *sum*
        ``sum_i C_i grad l_i``, exactly what Opacus's ghost clipping leaves in ``p.grad``.
    """

    max_grad_norm: float
    loss_reduction: str = "mean"

    def __post_init__(self) -> None:
        r = self.max_grad_norm
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise ConfigError(
                f"max_grad_norm must be a positive real number, got {r!r} "
                f"of type {type(r).__name__}"
            )
        if not math.isfinite(r) or r <= 0:
            raise ConfigError(
                f"max_grad_norm must be a positive finite number, got {r!r}; it is the "
                f"per-sample clipping bound R (a typical value is 1.0)"
            )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}; "
                f"use 'mean' if your loss averages over the batch, 'sum' if it sums"
            )
        object.__setattr__(self, "max_grad_norm", float(r))
