"""Poisson sampling of examples or of users, from any source of ``fx_bk.secure_random``.

``PoissonBatchSampler``: each step, every example (of this rank's share under
``torch.distributed``) is in the batch independently with probability ``sample_rate``: the
sampling DP-SGD's accountants assume (Opacus's ``DPDataLoader`` does the same from a PyTorch
generator; ``fx_bk.PrivacyEngine`` uses this sampler with ``secure_mode``).

``UserBatchSampler`` (user-level DP, ``fx_bk/user_level.py``): each step every *user* is in the
batch independently with probability ``sample_rate``; a sampled user brings up to
``max_examples`` of its examples (all of them, or that many drawn uniformly without
replacement), padded to exactly ``max_examples`` slots. A slot is an index ``i >= 0`` (an
example) or ``-1 - i`` (padding repeating example ``i``, masked out of the loss).

``EmptySafeCollator``: a Poisson batch may be empty; it collates as the structure of one
example with zero rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch


class PoissonBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for ``steps`` steps (``len``); ``indices``: the examples this process
    samples from (default all ``num_samples``)."""

    def __init__(self, num_samples: int, sample_rate: float, random, steps: int,
                 indices=None):
        self.indices = torch.arange(num_samples) if indices is None else torch.as_tensor(indices)
        self.sample_rate = sample_rate
        self.random = random
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            take = self.random.uniform(len(self.indices)) < self.sample_rate
            yield self.indices[take].tolist()


class UserBatchSampler(torch.utils.data.Sampler):
    """Batches of ``max_examples`` slots per sampled user (see the module docstring)."""

    def __init__(self, user_ids, sample_rate: float, max_examples: int, random, steps: int,
                 rank: int = 0, world: int = 1):
        examples = defaultdict(list)
        for i, u in enumerate(_as_list(user_ids)):
            examples[u].append(i)
        users = sorted(examples, key=str)
        self.users = [examples[u] for u in users[rank::world]]  # this process's share
        self.num_users = len(users)
        self.sample_rate = sample_rate
        self.max_examples = max_examples
        self.random = random
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        k = self.max_examples
        for _ in range(self.steps):
            take = (self.random.uniform(len(self.users)) < self.sample_rate).nonzero()
            slots: list[int] = []
            for u in take.flatten().tolist():
                mine = self.users[u]
                if len(mine) > k:  # k of them, uniformly without replacement
                    order = torch.argsort(self.random.uniform(len(mine)))[:k]
                    mine = [mine[j] for j in sorted(order.tolist())]
                slots += mine + [-1 - mine[0]] * (k - len(mine))
            yield slots


class EmptySafeCollator:
    """The collator, plus empty batches: every tensor of a one-example batch sliced to 0 rows."""

    def __init__(self, collate, template_example):
        self.collate = collate
        self.empty = _zero_rows(collate([template_example]))

    def __call__(self, examples):
        return self.collate(examples) if examples else self.empty


def _zero_rows(obj):
    if isinstance(obj, torch.Tensor):
        return obj[:0] if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return {k: _zero_rows(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_zero_rows(v) for v in obj)
    return obj


def _as_list(user_ids) -> list:
    if isinstance(user_ids, torch.Tensor):
        return user_ids.flatten().tolist()
    return list(user_ids)
