"""The frozen configuration of one ``fx_bk.transform`` call."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

LOSS_REDUCTIONS = ("mean", "sum")
CLIPPING_FUNCTIONS = ("abadi", "automatic", "global")
NONFINITE = ("skip", "raise")
CLIP_EPS = 1e-6  # C_i = min(1, R / (||grad_i|| + CLIP_EPS)), Opacus's formula
AUTOMATIC_GAMMA = 0.01  # automatic clipping (Bu et al.): C_i = R / (||grad_i|| + gamma)


def _check_norm(r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise ConfigError(
            f"max_grad_norm must be a positive real number, got {r!r} of type {type(r).__name__}"
        )
    if not math.isfinite(r) or r <= 0:
        raise ConfigError(
            f"max_grad_norm must be a positive finite number, got {r!r}; it is the "
            f"per-sample clipping bound R (a typical value is 1.0)"
        )
    return float(r)


@dataclass(frozen=True)
class BKConfig:
    """Book-Keeping DP-SGD settings.

    max_grad_norm: the clipping bound R on each sample's gradient; with clipping groups, one
        bound per group (a single number applies to every group).
    loss_reduction: how the user's loss combines per-sample losses: "mean" (the loss is
        ``mean_i l_i``) or "sum". Either way ``p.grad`` receives the clipped *sum*
        ``sum_i C_i grad l_i``, exactly what Opacus's ghost clipping leaves in ``p.grad``.
    clipping: the clip factor of a per-sample norm ``n``: "abadi" ``min(1, R/(n + 1e-6))``
        (Opacus), "automatic" ``R/(n + 0.01)`` (Bu et al., every sample rescaled), "global"
        ``1 if n <= R else 0`` (samples over the bound are dropped, the rest kept whole).
    clip_groups: ``None``: one norm over all trainable parameters (all-layer clipping). Else a
        partition of the trainable parameter names; each group is clipped by its own norm and
        bound, so a sample's whole gradient has norm at most ``sqrt(sum_k R_k^2)``.
    unbatched: names of forward arguments whose tensors are shared by all samples (never
        taken as batched, whatever their size).
    dynamic_dims: ``(argument, dims)`` pairs: dims of forward arguments traced with a symbolic
        size from the first call (a sequence length), so that one trace serves every size.
    automatic_dynamic: a dim (not the batch) whose size changes between two calls is traced
        symbolically from then on (as ``torch.compile``'s automatic dynamic shapes).
    nonfinite: a sample whose gradient norm is NaN or infinite (a NaN/Inf in its input, an
        overflow): "skip" (it contributes exactly zero, the others are unaffected, a warning
        names it) or "raise" (``fx_bk.NonFiniteSampleError`` in the backward, no gradient).
    """

    max_grad_norm: float | tuple[float, ...]
    loss_reduction: str = "mean"
    clipping: str = "abadi"
    clip_groups: tuple[tuple[str, ...], ...] | None = None
    nonfinite: str = "skip"
    unbatched: tuple[str, ...] = ()
    dynamic_dims: tuple[tuple[str, tuple[int, ...]], ...] = ()
    automatic_dynamic: bool = True

    def __post_init__(self) -> None:
        r = self.max_grad_norm
        if isinstance(r, (list, tuple)):
            r = tuple(_check_norm(x) for x in r)
            if self.clip_groups is None or len(r) != len(self.clip_groups):
                n = "no" if self.clip_groups is None else len(self.clip_groups)
                raise ConfigError(
                    f"max_grad_norm has {len(r)} values but there are {n} clipping groups; "
                    f"give one bound per group of clipping_style, or a single number"
                )
        else:
            r = _check_norm(r)
        object.__setattr__(self, "max_grad_norm", r)
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}; "
                f"use 'mean' if your loss averages over the batch, 'sum' if it sums"
            )
        if self.clipping not in CLIPPING_FUNCTIONS:
            raise ConfigError(
                f"clipping must be one of {CLIPPING_FUNCTIONS}, got {self.clipping!r}"
            )
        if self.nonfinite not in NONFINITE:
            raise ConfigError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")

    @property
    def group_bounds(self) -> tuple[float, ...]:
        """The bound R_k of each clipping group (one group for all-layer clipping)."""
        n = 1 if self.clip_groups is None else len(self.clip_groups)
        r = self.max_grad_norm
        return r if isinstance(r, tuple) else (r,) * n

    @property
    def sensitivity(self) -> float:
        """The L2 bound of one sample's clipped gradient: ``sqrt(sum_k R_k^2)`` (the noise
        standard deviation is ``noise_multiplier`` times this)."""
        return math.sqrt(sum(r * r for r in self.group_bounds))
