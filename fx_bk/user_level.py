"""User-level DP: the privacy unit is a user (a person who contributed several examples).

NOTE [user-level DP]: DP-SGD bounds what ONE unit can change in a step. At user level that is
the *sum* of a user's example gradients, so it is that sum that must be clipped to R, jointly,
not each example. fx_bk gets this exactly, in the one backward, by making the user the sample:

* the loader (``user_loader``) draws users by Poisson sampling and gives every sampled user
  ``K = max_examples`` slots: each batch leaf is ``[U, K, ...]``, with a mask ``[U, K]`` that is
  0 on padding slots;
* ``UserLevelModule`` runs the model on ``[U*K, ...]`` (the users' examples folded into the
  batch) and returns ``[U, K, ...]``; fx_bk's batch is U, so its per-sample norm is the norm of
  the user's whole gradient: each trainable op reads the U*K rows as K*T positions of one
  sample (the batch-folding layouts of ``passes/find_sites.py``), and the proof of sample
  independence now proves *user* independence (examples of one user may interact, users may
  not); an op that cannot read the fold is rejected with its name, never clipped per example;
* ``user_criterion`` makes a user's loss the mask-weighted *sum* of its examples' losses, and
  the batch loss their mean over users (``loss_reduction="mean"``) or sum, proven by
  ``checked_criterion``. A padding slot's loss weight is exactly 0, so its output gradient is
  0 and it adds nothing to any norm or gradient.

The accountant then counts users: sampling rate = expected users per step / number of users.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch

from .criterion import checked_criterion
from .errors import ConfigError
from .layout import flatten, unflatten
from .module_state import wrapped_attribute
from .sampling import UserBatchSampler


@dataclass(frozen=True)
class UserLevel:
    """``privacy_unit=fx_bk.UserLevel(user_ids, max_examples=k)`` for
    ``PrivacyEngine.make_private``: ``user_ids[i]`` is the user of example ``i`` of the data
    loader's dataset; a sampled user contributes at most ``max_examples`` examples per step (the
    loader's ``batch_size`` is then the expected number of *users* per step)."""

    user_ids: object
    max_examples: int

    def __post_init__(self):
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) \
                or self.max_examples < 1:
            raise ConfigError(f"UserLevel: max_examples must be a positive int (the examples a "
                              f"sampled user contributes per step), got {self.max_examples!r}")

    @property
    def num_users(self) -> int:
        ids = self.user_ids
        ids = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return len(set(ids))


class UserLevelModule(torch.nn.Module):
    """Runs ``module`` on the users' examples folded into the batch: every tensor argument
    ``[U, K, ...]`` is passed as ``[U*K, ...]``, every tensor output ``[U*K, ...]`` is returned
    as ``[U, K, ...]`` (outputs without dims are returned as they are)."""

    def __init__(self, module: torch.nn.Module, max_examples: int):
        super().__init__()
        self.module = module
        self.max_examples = max_examples

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the wrapped module (a HF ``config``)."""
        return wrapped_attribute(self, name, "module")

    def forward(self, *args, **kwargs):
        leaves: list = []
        layout = flatten((args, kwargs), leaves)
        k = self.max_examples
        users = None
        for i, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor):
                continue
            if x.dim() < 2 or x.shape[1] != k:
                raise ConfigError(
                    f"UserLevelModule({type(self.module).__name__}): argument tensor {i} has "
                    f"shape {list(x.shape)}; with privacy_unit=UserLevel(max_examples={k}) every "
                    f"tensor argument is [users, {k}, ...], as fx_bk.user_loader gives them")
            users = x.shape[0] if users is None else users
            leaves[i] = x.flatten(0, 1)
        (args, kwargs), _ = unflatten(layout, leaves)
        out = self.module(*args, **kwargs)
        out_leaves: list = []
        out_layout = flatten(out, out_leaves, outputs=True)
        out_leaves = [t.unflatten(0, (-1, k)) if isinstance(t, torch.Tensor) and t.dim() > 0
                      else t for t in out_leaves]
        return unflatten(out_layout, out_leaves)[0]


def user_criterion(criterion, loss_reduction: str = "mean"):
    """The user-level loss from a per-example ``criterion`` (``nn.CrossEntropyLoss()``, any
    loss module with a ``reduction``, or a function returning one loss per example):
    ``loss(output [U, K, ...], target [U, K, ...], mask [U, K])`` is, per user, the
    mask-weighted sum of its examples' losses, then the ``loss_reduction`` over users; it is a
    ``checked_criterion``, proven at its first call."""
    per_example = _unreduced(criterion)

    def loss(output, target, mask):
        users, k = mask.shape
        each = per_example(output.flatten(0, 1), target.flatten(0, 1))
        each = each.reshape(users, k, -1).sum(-1)  # a sequence loss: summed over positions
        per_user = (each * mask.to(each.dtype)).sum(1)
        return per_user.mean() if loss_reduction == "mean" else per_user.sum()

    return checked_criterion(loss, loss_reduction)


def _unreduced(criterion):
    """``criterion`` returning one loss per example: a loss module or function with a
    ``reduction`` (``nn.CrossEntropyLoss()``, ``F.cross_entropy``) gets ``"none"``."""
    if isinstance(criterion, torch.nn.Module) and hasattr(criterion, "reduction"):
        criterion = copy.copy(criterion)
        criterion.reduction = "none"
        return criterion
    try:
        takes_reduction = "reduction" in inspect.signature(criterion).parameters
    except (TypeError, ValueError):
        takes_reduction = False
    return functools.partial(criterion, reduction="none") if takes_reduction else criterion


class _Slots(torch.utils.data.Dataset):
    """The dataset read through ``UserBatchSampler``'s slots: ``(example, is_real)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, slot: int):
        return self.dataset[slot if slot >= 0 else -1 - slot], slot >= 0


class _UserCollate:
    """Collates a batch of slots into ``(examples [U, K, ...], mask [U, K])``; an empty batch
    (no user sampled) has ``U = 0`` and the leaves' other sizes from example 0."""

    def __init__(self, collate_fn, dataset, k: int):
        self.collate_fn, self.dataset, self.k = collate_fn, dataset, k

    def __call__(self, items):
        users = len(items) // self.k
        if users == 0:
            items = [(self.dataset[0], False)] * self.k
        batch = self.collate_fn([example for example, _ in items])
        mask = torch.tensor([real for _, real in items], dtype=torch.bool).view(-1, self.k)
        leaves: list = []
        layout = flatten(batch, leaves)
        leaves = [t.unflatten(0, (-1, self.k))[:users] if isinstance(t, torch.Tensor) else t
                  for t in leaves]
        return unflatten(layout, leaves)[0], mask[:users]


def user_loader(data_loader, unit: UserLevel, sample_rate: float, random, steps: int,
                rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """``data_loader``'s dataset and collate function, batches of users: ``steps`` batches of
    ``(examples, mask)`` with each user independently in a batch with probability
    ``sample_rate`` (the rate the accountant is given)."""
    dataset = data_loader.dataset
    ids = unit.user_ids
    if len(ids) != len(dataset):
        raise ConfigError(f"UserLevel: {len(ids)} user ids for a dataset of {len(dataset)} "
                          f"examples; give one user id per example")
    sampler = UserBatchSampler(ids, sample_rate, unit.max_examples, random, steps, rank, world)
    return torch.utils.data.DataLoader(
        _Slots(dataset), batch_sampler=sampler, num_workers=data_loader.num_workers,
        collate_fn=_UserCollate(data_loader.collate_fn, dataset, unit.max_examples),
        pin_memory=data_loader.pin_memory)
