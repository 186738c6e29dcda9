"""Hand the per-sample norms computed inside the backward graph to Python.

The norms exist only inside the (possibly compiled) backward. ``fx_bk::record_norms`` is an
opaque custom op: Inductor calls it as an extern kernel, its real implementation stores a copy
of the norms under the module's id, and it returns a zero scalar that the backward adds to one
gradient, so the op is live and never eliminated. Cost: one ``[B, K]`` copy per step.
"""

from __future__ import annotations

import torch

_LAST: dict[int, torch.Tensor] = {}


@torch.library.custom_op("fx_bk::record_norms", mutates_args=())
def record_norms(norms: torch.Tensor, key: int) -> torch.Tensor:
    _LAST[key] = norms.detach().clone()
    return norms.new_zeros(())


@record_norms.register_fake
def _record_norms_fake(norms: torch.Tensor, key: int) -> torch.Tensor:
    return norms.new_empty(())


def last_norms(key: int) -> torch.Tensor | None:
    return _LAST.get(key)


def forget(key: int) -> None:
    _LAST.pop(key, None)
