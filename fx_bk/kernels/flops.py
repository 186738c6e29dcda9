"""FLOP formulas of the opaque kernels, for ``torch.utils.flop_counter.FlopCounterMode`` (the
benchmark's arithmetic floor counts them like ATen's GEMMs)."""

from __future__ import annotations


def register_flops(op, formula) -> None:
    """Register ``formula`` for ``op`` (an ``OpOverloadPacket``); idempotent, and a no-op (fx_bk
    still imports) where ``torch.utils.flop_counter`` lacks the registry."""
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
    except ImportError:
        return
    if op not in flop_registry:
        register_flop_formula(op)(formula)
