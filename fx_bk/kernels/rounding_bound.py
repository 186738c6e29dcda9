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

A sample is *cancelling* when its computed ``n^2 < TAU * S^2`` (``S / ||G|| > 32``), or ``n^2``
is negative or NaN; other norms are kept as computed (relative error at most ``K u / TAU`` with
``K`` the true error constant: measured 4.4 on random cancelling samples, 57 with dot products
of 16384 equal terms, so at most 3.4e-3 on ``n^2``). A cancelling sample's norm becomes:

* inside the opaque ghost-norm op (Linear, matmul, im2col convolutions, LM heads): recomputed
  from float64 Grams of the same values (:func:`recompute_cancelling`), plus the clipped GEMM's
  own rounding ``K u S``: exact, no over-clipping beyond that term; on CPU, where instantiating
  costs less (``p d < T (d + p)``, long sequences), from the sample's float32 gradient
  ``g_i^T a_i`` plus its rounding ``K u S`` (an instantiated norm has no cancellation: over-clips
  by ``K u S / ||G||``, 3% at ``S / ||G|| = 6000``);
* in the norms traced into the graph (conv position Grams, the embedding's same-token Gram, the
  tie's cross term): the bound ``(sqrt(max(n^2, 0) + K u S^2) + K u S)^2``
  (:func:`guard_norm_sq`) with ``K = 16 + length / 16`` for sums of ``length`` products,
  generous against the errors measured; such a sample is over-clipped by a factor of about
  ``1 + K u (S / ||G||)^2 / 2`` (3e-3 at ``S / ||G|| = 32`` and ``length`` 768), and by up to
  ``sqrt(K u) S / ||G||`` when its terms cancel: never under-clipped.

From ``1 / TAU`` positions on, uncorrelated positions alone make ``S / ||G||`` about
``sqrt(T) > 32``: ordinary samples of long sequences (T = 1024, random data) met the test above
and were all recomputed in float64 (Grams at half the float32 rate). The CPU ghost-norm op
then also bounds each sample's error a posteriori, from the Grams' actual entries
(:func:`gram_error`):

    |n^2 - n^2_computed| <= u (K_p sum |A_st| |g_s| |g_t| + K_d sum |Q_st| |a_s| |a_t|
                               + K_T sum |A_st Q_st|) + K_d K_p u^2 S^2

(an entry of ``A = a a^T`` is a dot product of length d with error ``K_d u |a_s| |a_t|``, of ``Q``
likewise; the last sum is the products' summation). For uncorrelated positions the Grams'
off-diagonal entries are about ``1 / sqrt(d)`` of their norm bound, and this is a few hundred
times below ``K u S^2``. A sample the ``S`` test flags is kept when ``n^2`` is at least this
bound over ``KEPT_REL_ERROR``, the relative error the ``S`` test leaves a kept norm: either test
alone keeps only norms that accurate.

NaN stays NaN (the sample is then dropped by ``fx_bk.clipping``). Not bounded per sample: the
rounding of the sum over the batch, which all samples share.
"""

from __future__ import annotations

import torch

TAU = 1e-3  # n^2 / S^2 below which a norm is replaced by its rounding bound
# the relative error of n^2 a norm kept by the S test can have: K u / TAU, K = 57 (the largest
# error constant measured), float32
KEPT_REL_ERROR = 3.4e-3
# positions from which the ghost-norm op also bounds the error a posteriori (uncorrelated
# positions reach the S test's threshold there)
A_POSTERIORI_POSITIONS = round(1 / TAU)


def error_constant(length: int) -> float:
    """``K`` for sums of ``length`` products: ``16 + length / 16``. Measured error constants:
    at most 4.4 on random cancelling samples (dot lengths 16 to 3072), 57 at length 16384 on
    constant vectors (whose roundings all go one way, growing with the length)."""
    return 16.0 + length / 16.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of the dtype the Grams were computed in."""
    return torch.finfo(dtype).eps / 2


def position_bound(a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S_i = sum_t ||a_it|| ||g_it||`` for ``a: [B, *, T, d]``, ``g: [B, *, T, p]`` (every dim
    between the batch and the features is summed over), in ``dtype``. ``[B]``."""
    prod = torch.linalg.vector_norm(a.to(dtype), dim=-1) * torch.linalg.vector_norm(
        g.to(dtype), dim=-1)
    return prod.reshape(prod.shape[0], -1).sum(1)


def gram_error(abs_a_weighted: torch.Tensor, abs_q_weighted: torch.Tensor,
               abs_products: torch.Tensor, bound: torch.Tensor, d: int, p: int, t: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The a-posteriori bound of a ghost norm's rounding error (module docstring) from its sums
    ``sum |A_st| |g_s| |g_t|``, ``sum |Q_st| |a_s| |a_t|`` and ``sum |A_st Q_st|`` over all
    position pairs, ``S`` and the Grams' ``dtype``."""
    u = unit_roundoff(dtype)
    kd, kp = error_constant(d), error_constant(p)
    return u * (kp * abs_a_weighted + kd * abs_q_weighted + error_constant(t) * abs_products) \
        + kd * kp * u * u * bound * bound


def cancelling(norm_sq: torch.Tensor, bound: torch.Tensor,
               error: torch.Tensor | None = None) -> torch.Tensor:
    """The samples whose computed norm is not well above its rounding error (NaN included):
    ``n^2 < TAU S^2`` and, where the a-posteriori ``error`` is given, ``n^2 < error /
    KEPT_REL_ERROR`` too."""
    bad = ~(norm_sq >= TAU * bound * bound)
    if error is not None:
        bad = bad & ~(norm_sq >= error / KEPT_REL_ERROR)
    return bad


def guard_norm_sq(norm_sq: torch.Tensor, bound: torch.Tensor, gram_dtype: torch.dtype,
                  length: int, *, instantiated: bool = False) -> torch.Tensor:
    """``norm_sq`` [B] where it is well above its rounding error, else its upper bound (see the
    module docstring); ``bound`` is ``S`` [B], ``gram_dtype`` the dtype of the Gram products,
    ``length`` the number of terms of their longest sums (of the per-sample GEMM with
    ``instantiated``: the norm of an instantiated ``G_i``, whose error is ``K u S`` on the norm
    itself, not ``K u S^2`` on its square)."""
    ku = error_constant(length) * unit_roundoff(gram_dtype)
    s = bound.to(norm_sq.dtype)
    if instantiated:
        inflated = norm_sq.clamp_min(0).sqrt() + 2 * ku * s
    else:
        inflated = (norm_sq.clamp_min(0) + ku * s * s).sqrt() + ku * s
    return torch.where(cancelling(norm_sq, s), inflated * inflated, norm_sq)


def recompute_cancelling(norm_sq: torch.Tensor, bound: torch.Tensor, exact, positions: int,
                         length: int, error: torch.Tensor | None = None) -> torch.Tensor:
    """For norms computed inside an opaque op: the cancelling samples' norms recomputed by
    ``exact(index)`` (float64 Grams of the same values: products of float32 values are exact in
    float64; or an upper bound without cancellation, ``ghost_norm._recomputed_norms``), plus the
    clipped GEMM's own rounding ``K u S`` (``positions`` terms per sample).
    Only those samples are recomputed (none, for ordinary data); while a CUDA graph is being
    captured, every sample (no host sync). ``error``: the a-posteriori bound, if computed.
    ``exact`` gets a slice of every sample where all are recomputed (an index would copy the
    operands once more)."""
    bad = cancelling(norm_sq, bound, error)
    capturing = norm_sq.is_cuda and torch.cuda.is_current_stream_capturing()
    index = (torch.arange(norm_sq.shape[0], device=norm_sq.device) if capturing
             else bad.nonzero().squeeze(1))
    if not capturing and index.numel() == 0:
        return norm_sq
    whole = index.numel() == norm_sq.shape[0]
    s = bound[index].to(torch.float64)
    exact_sq = exact(slice(None) if whole else index).to(torch.float64).clamp_min(0)
    k64 = error_constant(length) * unit_roundoff(torch.float64)
    gemm = error_constant(positions) * unit_roundoff(norm_sq.dtype)
    refined = ((exact_sq + k64 * s * s).sqrt() + gemm * s).pow(2).to(norm_sq.dtype)
    out = norm_sq.clone()
    out[index] = torch.where(bad[index], refined, norm_sq[index])
    return out
