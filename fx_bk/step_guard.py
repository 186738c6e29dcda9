"""One clip per sample per step, and the per-sample norms handed to Python.

A BK program clips the samples of ONE forward call in ONE backward pass. Two ways around that
would let a sample reach ``p.grad`` clipped twice (sensitivity 2R, a privacy bug):

* two forward calls of the module feeding one backward (``(ce(bk(x), y) + ce(bk(2 * x), y))
  .backward()``, two views of one batch);
* a second backward through the same forward (``l1.backward(retain_graph=True);
  l2.backward()``).

Both are caught at run time, eager and compiled, by two opaque custom ops that Inductor calls
as extern kernels:

* ``fx_bk::step_token(x, key)`` in the forward graph: a fresh number per forward call (an int64
  scalar tensor the backward receives as a saved value), registered as pending for the module;
* ``fx_bk::record_norms(norms, key, token)`` in the backward graph: the token must be pending
  (else: a second backward through one forward) and no other backward of the module may have
  run in the same autograd graph task (else: two forwards in one backward); it then stores a
  copy of the per-sample norms (``module.last_per_sample_norms``) and returns a zero scalar the
  backward adds to one gradient, so the op is live and never eliminated.

Sequential accumulation (forward, backward, forward, backward, then ``optimizer.step()``) is
two graph tasks and two tokens: allowed. Tokens of forwards that are never backpropagated
expire after ``MAX_PENDING`` later forwards of the module. Cost: one scalar and one ``[B, K]``
copy per step.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict

import torch

from . import precision_guard
from ._torch_internals import current_graph_task_id, keep_in_forward
from .errors import ClipOnceError, NonFiniteSampleError

MAX_PENDING = 4096  # tokens of forwards awaiting their backward, per module
_LAST: dict[int, torch.Tensor] = {}
_PENDING: dict[int, OrderedDict] = {}  # key -> tokens of forwards not yet backpropagated
_TASK: dict[int, int] = {}  # key -> autograd graph task of the module's last backward
_LIVE: set[int] = set()  # keys of modules not yet garbage collected
_NONFINITE: dict[int, int] = {}  # key -> samples skipped for a NaN/Inf norm
_COLLECTED: dict[int, list] = {}  # key -> norms of every backward since the last take_norms
_tokens = itertools.count(1)


@torch.library.custom_op("fx_bk::step_token", mutates_args=())
def step_token(x: torch.Tensor, key: int) -> torch.Tensor:
    precision_guard.check(key, x.device.type)  # before any gradient of this step exists
    token = next(_tokens)
    pending = _PENDING.setdefault(key, OrderedDict())
    pending[token] = None
    while len(pending) > MAX_PENDING:
        pending.popitem(last=False)
    return torch.tensor(token, dtype=torch.int64)


@step_token.register_fake
def _step_token_fake(x: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64)


# A side effect: dead-code elimination keeps it wherever it is traced, so the partitioners put
# it in the forward graph (only the backward reads the token; as a plain op it would move there).
keep_in_forward(torch.ops.fx_bk.step_token.default)


@torch.library.custom_op("fx_bk::record_norms", mutates_args=())
def record_norms(norms: torch.Tensor, key: int, token: torch.Tensor,
                 raise_nonfinite: bool) -> torch.Tensor:
    task = current_graph_task_id()
    if task >= 0 and _TASK.get(key) == task:
        raise ClipOnceError(
            "fx_bk: one backward pass runs through two forward calls of the same fx_bk module "
            "(e.g. (loss(model(x)) + loss(model(x2))).backward()): each call clips its samples "
            "separately, so a sample seen by both would count twice (sensitivity 2R). Put all "
            "views of a sample into ONE call (concatenate them and compute the per-sample loss "
            "of each sample over its views), or call backward() after each forward (gradient "
            "accumulation). The gradients of this step are invalid: zero them"
        )
    if _PENDING.get(key, {}).pop(int(token), "gone") == "gone":
        raise ClipOnceError(
            "fx_bk: a second backward pass through the same forward call of an fx_bk module "
            "(backward(retain_graph=True), then backward again): its samples would be clipped "
            "and added twice (sensitivity 2R). Sum the losses and call backward() once per "
            "forward call. The gradients of this step are invalid: zero them"
        )
    _check_finite(norms, key, raise_nonfinite)
    if key in _LIVE:
        _TASK[key] = task
        _LAST[key] = norms.detach().clone()
        if key in _COLLECTED:
            _COLLECTED[key].append(_LAST[key])
    elif not _PENDING.get(key):
        _PENDING.pop(key, None)  # a freed module's last awaited backward
    return norms.new_zeros(())


@record_norms.register_fake
def _record_norms_fake(norms: torch.Tensor, key: int, token: torch.Tensor,
                       raise_nonfinite: bool) -> torch.Tensor:
    return norms.new_empty(())


def _check_finite(norms: torch.Tensor, key: int, raise_nonfinite: bool) -> None:
    """Samples whose norm is NaN/Inf were skipped by the clipping (``fx_bk/clipping.py``): say
    which, count them, or raise (``nonfinite="raise"``)."""
    bad = (~torch.isfinite(norms).all(1)).nonzero().flatten().tolist()
    if not bad:
        return
    what = (f"{len(bad)} of {norms.shape[0]} samples have a NaN or infinite gradient norm "
            f"(batch indices {bad[:20]}{' ...' if len(bad) > 20 else ''})")
    if raise_nonfinite:
        raise NonFiniteSampleError(
            f"fx_bk: {what}. Check these samples' inputs and labels, or let fx_bk skip such "
            f"samples (nonfinite='skip'). The gradients of this step are invalid: zero them")
    _NONFINITE[key] = _NONFINITE.get(key, 0) + len(bad)
    warnings.warn(f"fx_bk: {what}; they contribute zero to this step, the other samples are "
                  f"unaffected (module.nonfinite_samples counts them)", stacklevel=2)


def nonfinite_count(key: int) -> int:
    return _NONFINITE.get(key, 0)


def last_norms(key: int) -> torch.Tensor | None:
    return _LAST.get(key)


def collect_norms(key: int) -> None:
    """Keep the norms of every backward of the module from now on (adaptive clipping reads
    those of all micro-batches of a step), until ``take_norms``."""
    _COLLECTED.setdefault(key, [])


def take_norms(key: int) -> torch.Tensor | None:
    """The norms ``[N, K]`` collected since the last call (None: no backward ran)."""
    got = _COLLECTED.get(key)
    if not got:
        return None
    _COLLECTED[key] = []
    return torch.cat(got)


def register(key: int) -> None:
    """A new fx_bk module (``fx_bk.runtime.BKModule``) with this key."""
    _LIVE.add(key)


def forget(key: int) -> None:
    """The module is gone: drop its state, except tokens of forwards whose backward may still
    run (``fx_bk.transform(m)(x).sum().backward()`` frees the module before the backward)."""
    _LIVE.discard(key)
    precision_guard.forget(key)
    _LAST.pop(key, None)
    _NONFINITE.pop(key, None)
    _COLLECTED.pop(key, None)
    _TASK.pop(key, None)
    if not _PENDING.get(key):
        _PENDING.pop(key, None)
