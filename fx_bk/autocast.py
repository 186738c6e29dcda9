"""Mixed precision: the autocast state a BK program is traced for, and entering it explicitly.

Pre-dispatch ``make_fx`` records ``aten.linear`` above the Autocast dispatch key: the forward
graph holds no casts, only its ``meta["val"]`` dtypes show them. The forward graph is therefore
only meaningful under the autocast state it was traced with. fx_bk reads that state once per
call (:func:`current_state`), keys its program cache on it, and re-enters it explicitly
(:func:`entered`) wherever the forward graph runs: tracing, the sample-independence check and the
joint trace, where ``make_fx`` (not pre-dispatch) records the casts as ``_to_copy`` ops, so the
partitioned forward/backward graphs are self-contained and run with autocast off
(:func:`disabled`). The per-sample norms, clip factors and clipped sums run with autocast off:
norms, clip factors and clipped sums on float32 copies of the site tensors; instantiated
per-sample gradients may read them in the autocast dtype (``SiteValues.computed``: convolutions,
as AMP's own weight-gradient kernel; see ``passes/build_joint.py``).
"""

from __future__ import annotations

import contextlib

import torch

# ((device_type, enabled, dtype), ...) for every device type the program's tensors live on
AutocastState = tuple


def device_types(tensors) -> tuple[str, ...]:
    """Sorted device types of ``tensors`` that autocast supports (``meta`` has no autocast)."""
    kinds = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    return tuple(sorted(k for k in kinds if torch.amp.is_autocast_available(k)))


def current_state(kinds: tuple[str, ...]) -> AutocastState:
    """The thread's autocast state for each device type (the dtype only matters when enabled,
    so a disabled device records ``None``: one cache entry for "no autocast")."""
    state = []
    for kind in kinds:
        enabled = torch.is_autocast_enabled(kind)
        state.append((kind, enabled, torch.get_autocast_dtype(kind) if enabled else None))
    return tuple(state)


def is_enabled(state: AutocastState) -> bool:
    return any(enabled for _, enabled, _ in state)


@contextlib.contextmanager
def entered(state: AutocastState):
    """Run under exactly ``state`` whatever the caller's autocast state is. The cast cache is
    off: it would keep casts of fake/traced weights alive past the trace."""
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype in state:
            stack.enter_context(
                torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=False)
            )
        yield


def disabled(state: AutocastState):
    """Autocast off for the device types of ``state`` (its graphs already hold their casts)."""
    return entered(tuple((kind, False, None) for kind, _, _ in state))
