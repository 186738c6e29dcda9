"""``fx_bk::ghost_norm``: per-sample ``||g_i^T a_i||_F^2`` without the ``[p, d]`` gradient.

``a: [B, T, d]``, ``g: [B, T, p]`` -> ``[B]`` float32 (float64 for float64 inputs):

    ||G_i||^2 = sum_{s,t} (a_is . a_it) (g_is . g_it) = sum(A_i * Q_i),  A = a a^T, Q = g g^T

Both Gram matrices are symmetric, so with T cut into chunks of ``block`` positions
(``cost_model.ghost_block``: 64, 128 from 512 positions on) only block pairs ``k <= l`` are
computed, off-diagonal ones counted twice: about half the ghost FLOPs, and
memory ``B * block * T`` instead of ``B * T^2``. Per block row ``k``:
``2 * sum(A[k, k:] * Q[k, k:]) - sum(A[k, k] * Q[k, k])``.

* CPU (and any device without Triton): that block-row loop in plain PyTorch.
* CUDA with Triton: ``triton_ghost_norm.py``, one program per (sample, block pair k <= l) that
  builds the two ``block x block`` Gram tiles in registers (looping over d and p) and adds its
  weighted sum to the sample's norm: no Gram matrix ever reaches memory.

A sample whose positions' terms cancel (computed norm far below ``sum_t ||a_t|| ||g_t||``) has
its norm recomputed from float64 Grams (``rounding_bound.recompute_cancelling``; the by-length
op's instantiated branch: ``guard_norm_sq``), so that rounding cannot let it add more than ``R``
through the clipped GEMM.

A custom op with a fake implementation, so the joint graph and Inductor see one opaque call.
Opaque to ``torch.utils.flop_counter.FlopCounterMode`` too, so a FLOP formula is registered for
it: ``2 * B * ghost_cost(T, d, p, block)`` (the Gram products, as for ``bmm``).
"""

from __future__ import annotations

import torch

from fx_bk.cost_model import ghost_block, ghost_cost

from .flops import register_flops
from .rounding_bound import (
    A_POSTERIORI_POSITIONS,
    error_constant,
    gram_error,
    guard_norm_sq,
    position_bound,
    recompute_cancelling,
    unit_roundoff,
)


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ghost_norm_reference(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The unblocked formula (for tests): ``sum(a a^T * g g^T)`` per sample."""
    acc = _out_dtype(a)
    aa = torch.bmm(a.to(acc), a.to(acc).transpose(1, 2))
    gg = torch.bmm(g.to(acc), g.to(acc).transpose(1, 2))
    return (aa * gg).sum((1, 2))


def ghost_norm_blocked(a: torch.Tensor, g: torch.Tensor, block: int | None = None):
    """Symmetric block rows in PyTorch ops (the CPU implementation), without the guard; blocks
    of ``ghost_block(T)`` positions unless ``block`` is given."""
    return _ghost_blocks(a, g, block)[0]


def _ghost_blocks(a: torch.Tensor, g: torch.Tensor, block: int | None, with_error: bool = False):
    """The blocked ghost norm and the rounding guard's ``S = sum_t ||a_t|| ||g_t||``, read off
    the diagonal blocks' diagonals (``||a_t||^2 ||g_t||^2``): no extra pass over ``a`` and ``g``.
    With ``with_error``, also the a-posteriori bound of the norm's rounding error
    (``rounding_bound.gram_error``: the Gram blocks' absolute values, weighted by the other
    operand's position norms, summed in the same loop), else None."""
    acc = _out_dtype(a)
    a, g = a.to(acc), g.to(acc)
    t = a.shape[1]
    block = ghost_block(t) if block is None else block
    total = bound = a.new_zeros(a.shape[0])
    if with_error:
        norm_a, norm_g = torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(g, dim=-1)
        abs_a = abs_q = abs_prod = total
    for k in range(0, t, block):
        ak, gk = a[:, k : k + block], g[:, k : k + block]
        n = ak.shape[1]
        rows_a = torch.bmm(ak, a[:, k:].transpose(1, 2))  # [B, block, T - k]: rows of A
        rows_q = torch.bmm(gk, g[:, k:].transpose(1, 2))  # and of Q
        if with_error:
            prod = rows_a * rows_q
            abs_a = abs_a + _pair_sum(_weighted_abs(rows_a, norm_g, k, n), n)
            abs_q = abs_q + _pair_sum(_weighted_abs(rows_q, norm_a, k, n), n)
        else:
            prod = rows_a.mul_(rows_q)
        total = total + _pair_sum(prod, n)
        bound = bound + torch.diagonal(prod[:, :, :n], dim1=1, dim2=2).clamp_min(0).sqrt_().sum(1)
        if with_error:
            abs_prod = abs_prod + _pair_sum(prod.abs_(), n)
    if not with_error:
        return total, bound, None
    error = gram_error(abs_a, abs_q, abs_prod, bound, a.shape[-1], g.shape[-1], t, acc)
    return total, bound, error


def _pair_sum(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``sum_{s,t}`` over every position pair of a block row's ``[B, n, T - k]`` values: the
    off-diagonal blocks stand for their mirror images too."""
    return rows.sum((1, 2)).mul_(2).sub_(rows[:, :, :n].sum((1, 2)))


def _weighted_abs(rows: torch.Tensor, norms: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """``|rows_st| norms_s norms_t`` (in place)."""
    return rows.abs_().mul_(norms[:, k : k + n, None]).mul_(norms[:, None, k:])


@torch.library.custom_op("fx_bk::ghost_norm", mutates_args=())
def ghost_norm(a: torch.Tensor, g: torch.Tensor, block: int | None = None) -> torch.Tensor:
    acc = _out_dtype(a)
    if a.is_cuda and _triton_available():
        from .triton_ghost_norm import triton_ghost_norm

        norm_sq, bound = triton_ghost_norm(a, g), position_bound(a, g, acc)
        error = None
    else:  # from A_POSTERIORI_POSITIONS on, ordinary samples reach the S test (rounding_bound)
        long = acc == torch.float32 and a.shape[1] >= A_POSTERIORI_POSITIONS
        norm_sq, bound, error = _ghost_blocks(a, g, block, with_error=long)
    length = max(a.shape[-1], g.shape[-1], a.shape[1])
    if acc == torch.float64:
        return guard_norm_sq(norm_sq, bound, acc, length)
    exact = lambda i: _recomputed_norms(a[i], g[i], block, bound[i])  # noqa: E731
    return recompute_cancelling(norm_sq, bound, exact, a.shape[1], length, error)


def _recomputed_norms(a: torch.Tensor, g: torch.Tensor, block: int | None,
                      bound: torch.Tensor) -> torch.Tensor:
    """Squared norms of cancelling samples, float64, for ``recompute_cancelling``: from float64
    Grams of the same values (exact), or on CPU where that costs more than instantiating
    (``p d < T (d + p)``: long sequences) from each sample's float32 gradient ``g_i^T a_i`` plus its
    rounding: an instantiated gradient errs by at most ``K u S`` in norm (``K`` for sums of T
    products), not by ``K u S^2`` as a Gram sum does, so ``(||G_i|| + K u S)^2`` bounds the
    norm without cancellation. ``bound``: those samples' ``S``, as the op computed it."""
    t, d, p = a.shape[1], a.shape[-1], g.shape[-1]
    if a.is_cuda or p * d >= t * (d + p):
        return _ghost_blocks(a.double(), g.double(), block)[0]
    acc = _out_dtype(a)
    u = unit_roundoff(acc)
    ku_s = error_constant(t) * u * bound.double()
    rows_up = 1 / (1 - (d + 1) * u)  # a row's squares and their sum, all positive: relative
    out = []
    for ai, gi in zip(a.to(acc), g.to(acc)):
        per_sample = torch.mm(gi.t(), ai)  # [p, d]
        out.append(((per_sample * per_sample).sum(1).double().sum() * rows_up).sqrt())
    return (torch.stack(out) + ku_s).pow(2)


@ghost_norm.register_fake
def _ghost_norm_fake(a, g, block=None):
    torch._check(a.shape[0] == g.shape[0] and a.shape[1] == g.shape[1])
    return a.new_empty(a.shape[0], dtype=_out_dtype(a))


@torch.library.custom_op("fx_bk::gemm_norm_by_length", mutates_args=())
def gemm_norm_by_length(a: torch.Tensor, g: torch.Tensor, max_ghost_positions: int) -> torch.Tensor:
    """``||g_i^T a_i||_F^2`` per sample, by the ghost norm while ``T <= max_ghost_positions``
    and by instantiating ``g_i^T a_i`` beyond: the choice is made per call, on the concrete
    T, inside one opaque op, so a graph traced with a symbolic T takes the cheaper formula at
    every length (``Strategy.BY_LENGTH``)."""
    if a.shape[1] <= max_ghost_positions:
        return ghost_norm(a, g)
    per_sample = torch.bmm(g.transpose(1, 2), a)  # [B, p, d], in the inputs' dtype
    acc = _out_dtype(a)  # the clipped GEMM rounds differently: its u * S_i (rounding_bound.py)
    return guard_norm_sq(per_sample.to(acc).pow(2).sum((1, 2)), position_bound(a, g, acc), a.dtype,
                         a.shape[1], instantiated=True)


@gemm_norm_by_length.register_fake
def _gemm_norm_by_length_fake(a, g, max_ghost_positions):
    torch._check(a.shape[0] == g.shape[0] and a.shape[1] == g.shape[1])
    return a.new_empty(a.shape[0], dtype=_out_dtype(a))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _ghost_norm_flops(a_shape, g_shape, block: int | None = None, **kwargs) -> int:
    """FLOPs of ``ghost_norm(a [B, T, d], g [B, T, p], block)``: 2 per multiply-add (shapes in,
    as ``FlopCounterMode`` passes them; ``kwargs``: its ``out_shape``)."""
    b, t, d = a_shape
    return 2 * b * ghost_cost(t, d, g_shape[-1], block)


def _gemm_norm_flops(a_shape, g_shape, max_ghost_positions: int, **kwargs) -> int:
    """FLOPs of ``gemm_norm_by_length``: the ghost norm's, or the ``[B, p, d]`` bmm's and its
    squared sum."""
    b, t, d = a_shape
    if t <= max_ghost_positions:
        return _ghost_norm_flops(a_shape, g_shape)
    return 2 * b * t * d * g_shape[-1] + 2 * b * d * g_shape[-1]


register_flops(torch.ops.fx_bk.ghost_norm, _ghost_norm_flops)
register_flops(torch.ops.fx_bk.gemm_norm_by_length, _gemm_norm_flops)
