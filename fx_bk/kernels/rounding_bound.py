"""A ghost norm that rounding cannot shrink below the clipped sum's norm.

A ghost norm ``||G_i||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)`` (and every norm of that form: the
conv position Grams, the embedding's same-token Gram, the tie's cross term) is a sum of signed
terms whose rounding errors are of the order of ``u * S_i^2``, where

    S_i = sum_t ||a_t|| ||g_t||   (>= ||G_i||, by the triangle inequality)

and ``u`` is the unit roundoff of the dtype the Grams are computed in. When the positions' terms
``g_t a_t^T`` nearly cancel (``S_i / ||G_i||`` in the thousands), that error is as large as
``||G_i||^2`` itself: the computed norm can come out near zero while the clipped GEMM, whose
error is only ``u * S_i``, still adds the full ``G_i``. Measured in float32 on two positions
with ``a_1 = a_2`` and ``g_2 = -g_1 + 3e-4 w`` (d = p = 768, ``||G_i||`` near 3 R, 256 such
samples): computed norms down to 0, contributions up to 3.4 R, and 377 R with the activations
100 times larger (tests/test_rounding_bound.py).

The guard, per sample: a computed ``n^2`` with ``n^2 >= TAU * S^2`` is kept as it is (its
relative error is then at most ``K u / TAU``: 2.6e-4 with the error constant measured, 1.9e-3
with ``K``); a smaller one (or a negative one) is replaced by the bound
``(sqrt(max(n^2, 0) + K u S^2) + K u S)^2``, which holds the true norm whenever the Gram error
is at most ``K u S^2`` and adds the clipped GEMM's own ``K u S``. ``K = 32``: the largest error
measured over cancelling constructions (d, p from 16 to 3072; T = 2, 4, 16) was ``4.4 u S^2``.
Samples the guard replaces are over-clipped by a factor ``1 + K u (S / ||G||)^2 / 2`` at most
while ``S / ||G||`` is moderate (1e-3 at ``S / ||G|| = 32``, the threshold), and by up to
``sqrt(K u) S / ||G||`` for cancelling ones: never under-clipped. NaN stays NaN (the sample is
then dropped by ``fx_bk.clipping``).
"""

from __future__ import annotations

import torch

TAU = 1e-3  # n^2 / S^2 below which a norm is replaced by its rounding bound
K = 32.0  # the Gram error bound, in units of u * S^2 (measured <= 4.4)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of the dtype the Grams were computed in."""
    return torch.finfo(dtype).eps / 2


def position_bound(a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S_i = sum_t ||a_it|| ||g_it||`` for ``a: [B, *, T, d]``, ``g: [B, *, T, p]`` (every dim
    between the batch and the features is summed over), in ``dtype``. ``[B]``."""
    prod = torch.linalg.vector_norm(a.to(dtype), dim=-1) * torch.linalg.vector_norm(
        g.to(dtype), dim=-1)
    return prod.reshape(prod.shape[0], -1).sum(1)


def guard_norm_sq(norm_sq: torch.Tensor, bound: torch.Tensor, gram_dtype: torch.dtype, *,
                  instantiated: bool = False) -> torch.Tensor:
    """``norm_sq`` [B] where it is well above its rounding error, else its upper bound (see the
    module docstring); ``bound`` is ``S`` [B], ``gram_dtype`` the dtype of the Gram products
    (of the per-sample GEMM with ``instantiated``: the norm of an instantiated ``G_i``, whose
    error is ``K u S`` on the norm itself, not ``K u S^2`` on its square)."""
    ku = K * unit_roundoff(gram_dtype)
    s = bound.to(norm_sq.dtype)
    if instantiated:
        inflated = norm_sq.clamp_min(0).sqrt() + 2 * ku * s
    else:
        inflated = (norm_sq.clamp_min(0) + ku * s * s).sqrt() + ku * s
    return torch.where(norm_sq >= TAU * s * s, norm_sq, inflated * inflated)
