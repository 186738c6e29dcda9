"""Adaptive clipping: the bound R follows a quantile of the per-sample norms, privately.

NOTE [adaptive clipping] (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021, Section 3). After each step, the fraction of
samples (units: users at user level) whose gradient norm was at most R is released with
noise, and R moves geometrically towards the target quantile ``gamma``:

    s      = sum_i (1[n_i <= R] - 1/2) + N(0, sigma_b^2)        (summed over all processes)
    b      = s / m + 1/2                                          (m: the expected batch size)
    R_next = R * exp(-eta * (b - gamma))

Centering the indicators at 1/2 makes the released sum's sensitivity 1/2 under adding or
removing one unit. Clipping groups (per-layer clipping) release one such sum per group (L2
sensitivity sqrt(K)/2) and update each group's bound from its own.

Privacy: one step releases the noised clipped sum (sensitivity S = sqrt(sum_k R_k^2), noise
std ``sigma_grad * S``) and the K noised counts, for the same Poisson batch: one Gaussian
mechanism with noise multiplier ``z`` where

    z^-2 = sigma_grad^-2 + K / (4 sigma_b^2)          (Andrew et al., Theorem 1, for K = 1)

So the engine accounts every step with the ``noise_multiplier`` the user asked for, ``z``, and
adds gradient noise with the larger ``sigma_grad = (z^-2 - K / (4 sigma_b^2))^-1/2``: the
count's privacy cost is paid by the gradient noise, and epsilon is that of ``z``. This needs
``sigma_b > sqrt(K) z / 2``; Andrew et al. recommend ``sigma_b = m / 20``, the default.

The norms come from the one backward (``BKModule`` records them), the new bound is an input of
the compiled graphs (``BKModule.set_clip_bounds``): no second pass, no new trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class AdaptiveClipping:
    """``adaptive_clipping=fx_bk.AdaptiveClipping(target_quantile=0.5)`` for
    ``PrivacyEngine.make_private``: ``max_grad_norm`` is then the initial bound.

    target_quantile: the fraction ``gamma`` of samples to leave unclipped.
    learning_rate: ``eta`` of the geometric update (Andrew et al. use 0.2).
    count_noise_std: ``sigma_b``, the std of the noise on the count; None: expected batch / 20.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ConfigError(f"AdaptiveClipping: target_quantile must be in [0, 1], got "
                              f"{self.target_quantile!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"AdaptiveClipping: learning_rate must be > 0, got "
                              f"{self.learning_rate!r}")
        if self.count_noise_std is not None and not self.count_noise_std > 0:
            raise ConfigError(f"AdaptiveClipping: count_noise_std must be > 0, got "
                              f"{self.count_noise_std!r}")


def gradient_noise_multiplier(noise_multiplier: float, count_noise_std: float,
                              groups: int) -> float:
    """``sigma_grad`` of NOTE [adaptive clipping]: the gradient's noise multiplier that, with
    the counts' noise, makes one Gaussian mechanism of multiplier ``noise_multiplier``."""
    if noise_multiplier == 0:
        return 0.0  # no privacy claimed at all (epsilon is infinite either way)
    rest = noise_multiplier ** -2 - groups / (4 * count_noise_std ** 2)
    if rest <= 0:
        raise ConfigError(
            f"AdaptiveClipping: count_noise_std={count_noise_std:g} is too small for "
            f"noise_multiplier={noise_multiplier:g} with {groups} clipping group(s): the counts "
            f"alone would spend more than the whole budget. It must exceed "
            f"{math.sqrt(groups) * noise_multiplier / 2:g}; raise it (the default is the "
            f"expected batch size / 20) or the noise multiplier")
    return rest ** -0.5


class AdaptiveClipState:
    """The running update of one DP optimizer's bounds (NOTE [adaptive clipping])."""

    def __init__(self, config: AdaptiveClipping, expected_batch_size: float, groups: int,
                 random, all_reduce=None):
        self.config = config
        self.expected = expected_batch_size  # over all processes
        self.count_noise_std = config.count_noise_std or expected_batch_size / 20
        self.groups = groups
        self.random = random  # the noise source (shared by all processes)
        self.all_reduce = all_reduce  # sums a tensor over the processes; None in one

    def next_bounds(self, norms: torch.Tensor | None, bounds: tuple[float, ...]):
        """The bounds for the next step from this step's per-sample norms ``[N, K]`` (None:
        no sample at all), clipped with ``bounds``. Returns (bounds, unclipped fractions)."""
        r = torch.tensor(bounds, dtype=torch.float64)
        if norms is None:
            centered = torch.zeros(self.groups, dtype=torch.float64)
        else:
            unclipped = (norms.to(torch.float64).cpu() <= r).to(torch.float64)
            centered = (unclipped - 0.5).sum(0)
        if self.all_reduce is not None:
            centered = self.all_reduce(centered)
        noisy = centered + self.random.normal(self.count_noise_std, centered)
        fraction = noisy / self.expected + 0.5
        new = r * torch.exp(-self.config.learning_rate * (fraction - self.config.target_quantile))
        return tuple(new.tolist()), fraction
