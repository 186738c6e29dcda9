"""fx_bk with other training frameworks, and what their integrations share.

* :mod:`fx_bk.integrations.transformers`: ``DPTrainer``, a Hugging Face ``transformers.Trainer``
  that trains with DP-SGD (fx_bk clipping, Poisson sampling, Opacus noise and accounting).

Each integration is imported on its own (``from fx_bk.integrations.transformers import
DPTrainer``); this package needs only torch and NumPy. Shared here: ``PoissonBatchSampler``
(Poisson sampling of logical batches, resumable), ``EmptySafeCollator`` (collates the empty
batches Poisson sampling yields), ``derive_seed`` (independent seeded streams),
``default_per_sample_loss`` and ``check_noise_settings``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import sequence_cross_entropy
from ..sampling import EmptySafeCollator

__all__ = ["NOISE_STREAM", "SAMPLER_STREAM", "EmptySafeCollator", "PoissonBatchSampler",
           "check_noise_settings", "default_per_sample_loss", "derive_seed"]

SAMPLER_STREAM, NOISE_STREAM = 0, 1  # independent streams derived from one secret seed


def derive_seed(*words: int) -> int:
    """A 64-bit seed from non-negative integers (NumPy's SeedSequence hash)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


class PoissonBatchSampler(torch.utils.data.Sampler):
    """Poisson sampling for a ``DataLoader``'s ``batch_sampler``: each logical batch includes each
    of ``num_samples`` examples independently with probability ``sample_rate``, and is yielded as
    ``num_micro_batches`` index lists (possibly empty). An epoch is ``steps_per_epoch`` logical
    batches.

    Logical batch ``t`` (counted over the whole run, ``first_step()`` at the epoch's start) is a
    function of ``(seed, run, t)`` alone, so a resumed run draws exactly the batches of an
    uninterrupted one, whatever the loader prefetched or skipped; ``run`` tells apart the
    fresh ``train()`` calls of one trainer."""

    def __init__(self, num_samples: int, sample_rate: float, steps_per_epoch: int,
                 num_micro_batches: int, seed: int, first_step: Callable[[], int] = lambda: 0):
        self.num_samples, self.sample_rate = num_samples, sample_rate
        self.steps_per_epoch, self.num_micro_batches = steps_per_epoch, num_micro_batches
        self.seed, self.run, self.first_step = seed, 0, first_step

    def __len__(self) -> int:
        return self.steps_per_epoch * self.num_micro_batches

    def logical_batch(self, step: int, run: int | None = None) -> torch.Tensor:
        """The indices of logical batch ``step`` (sorted, int64)."""
        run = self.run if run is None else run
        g = torch.Generator().manual_seed(derive_seed(self.seed, SAMPLER_STREAM, run, step))
        return torch.nonzero(torch.rand(self.num_samples, generator=g) < self.sample_rate)[:, 0]

    def __iter__(self):
        start = self.first_step()
        for s in range(self.steps_per_epoch):
            for part in torch.tensor_split(self.logical_batch(start + s), self.num_micro_batches):
                yield part.tolist()


def default_per_sample_loss(*, shift_labels: bool = False, problem_type: str | None = None):
    """The per-sample loss ``fn(outputs, labels) -> [B]`` ``DPTrainer`` uses by default, for the
    usual heads:
    token labels ``[B, T]`` (``sequence_cross_entropy``, shifted for a causal LM), class labels
    ``[B]`` (cross entropy), float labels (squared error, or binary cross entropy for
    ``problem_type="multi_label_classification"``), each a mean over the sample's own entries."""

    def per_sample_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
        logits = (outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]).float()
        b = labels.shape[0]
        if labels.is_floating_point():
            if problem_type == "multi_label_classification":
                bce = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
                return bce.reshape(b, -1).mean(1)
            return (logits.reshape(b, -1) - labels.float().reshape(b, -1)).pow(2).mean(1)
        if logits.dim() == 3 and labels.dim() == 2:
            return sequence_cross_entropy(logits, labels, shift=shift_labels)
        if logits.dim() == 2 and labels.dim() == 1:
            return F.cross_entropy(logits, labels, reduction="none")
        raise ConfigError(
            f"DPTrainer: no default per-sample loss for logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)} ({labels.dtype}); pass per_sample_loss=fn(outputs, labels) "
            f"returning one loss per sample, shape [B]"
        )

    return per_sample_loss


def check_noise_settings(noise_multiplier, target_epsilon, target_delta) -> None:
    """Exactly one of ``noise_multiplier`` (>= 0) and ``target_epsilon`` (> 0); delta in (0, 1)."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError("give exactly one of noise_multiplier and target_epsilon, "
                          f"got noise_multiplier={noise_multiplier}, "
                          f"target_epsilon={target_epsilon}")
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if target_epsilon is not None and not target_epsilon > 0:
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < target_delta < 1:
        raise ConfigError(f"target_delta must be in (0, 1), got {target_delta}")
