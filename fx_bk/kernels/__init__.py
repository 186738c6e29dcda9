"""Fused kernels used by the per-sample rules (custom ops: one extern call for Inductor)."""
