"""The per-sample arithmetic the rules share: batch dim 0, ``c: [B]`` clip factors.

A sample with ``c_i = 0`` (a skipped non-finite sample) must add exactly zero to a clipped sum,
even if its values are NaN/Inf: the scalings here mask instead of multiplying by zero.
"""

from __future__ import annotations

import torch

from fx_bk.kernels.clipped_gemm import scale_goes_to_g


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """Norms are accumulated in at least float32."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def scale_samples(c: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``c_i * per_sample[i]`` (batch dim 0), exactly zero where ``c_i = 0`` even if the sample
    holds NaN/Inf (a skipped non-finite sample: ``0 * NaN`` would be NaN). One fused
    elementwise pass under Inductor."""
    cv = c.to(per_sample.dtype).reshape(-1, *[1] * (per_sample.dim() - 1))
    return torch.where(cv != 0, per_sample * cv, 0.0)


def keep_samples(c: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``per_sample`` with the samples whose ``c_i = 0`` set to exactly zero: the unscaled
    factor of a clipped GEMM ``(c g)^T a`` (a skipped NaN sample in ``a`` would poison it)."""
    cv = c.reshape(-1, *[1] * (per_sample.dim() - 1))
    return torch.where(cv != 0, per_sample, 0.0)


def scale_smaller(x: torch.Tensor, g: torch.Tensor, c: torch.Tensor):
    """``(keep(x), c g)`` or ``(c x, keep(g))``, whichever scales fewer elements per sample (a
    static choice): a clipped weight gradient ``sum_i c_i W(x_i, g_i)`` is bilinear in its input
    and output gradient."""
    if scale_goes_to_g(x, g):
        return keep_samples(c, x), scale_samples(c, g)
    return scale_samples(c, x), keep_samples(c, g)


def weighted_sum(c: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i * per_sample[i]``; c: [B], per_sample: [B, *shape] -> [*shape]; samples with
    ``c_i = 0`` add exactly zero (``scale_samples``). Inductor fuses it into one reduction."""
    return scale_samples(c, per_sample).sum(0)


def sum_pairs(t: torch.Tensor) -> torch.Tensor:
    """``[B, T, T']`` -> ``[B]``, summed over ``T'`` and then ``T``: two reductions of one length
    each. Inductor's CPU code guards a float32 sum on its size (more than 4096 elements or
    not); one reduction over ``T * T'`` would put that guard at T = 64, inside the lengths a run
    sees, and a symbolic-length graph would recompile there."""
    return t.sum(2).sum(1)


def squared_norm(per_sample: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B]."""
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return flat.to(accumulation_dtype(flat)).pow(2).sum(1)
