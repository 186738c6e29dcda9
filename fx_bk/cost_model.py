"""The time model that picks each site's strategy, in multiply-add equivalents per sample.

For a GEMM-like site (Linear, matmul, a convolution after im2col) with ``a_i: [T, d]`` and
``g_i: [T, p]`` per sample:

* rank-one (T = 1):  ``d + p``
* ghost:             ``sum(a a^T * g g^T)`` over symmetric block pairs k <= l (blocks of
                     :func:`ghost_block` positions): about ``T^2 (d + p) / 2``
                     (:func:`ghost_cost`)
* instantiate:       ``G_i = g_i^T a_i``: ``T p d`` multiply-adds, charged
                     ``(T + INSTANTIATE_OVERHEAD) p d`` (:func:`instantiated_cost`)

whichever is cheaper. Instantiated-only rules (normalization affines, broadcasts, the fallback)
cost the size of their per-sample gradients.
"""

from __future__ import annotations

import math

from .site import Site, Strategy, per_sample_numel

# Positions per block of fx_bk::ghost_norm's symmetric Gram blocks (:func:`ghost_block`): at 512
# positions and more, blocks of 128 make faster GEMMs than the 64 of shorter sequences, though
# they cover slightly more of the Gram (measured on a 2-thread CPU, d = 256, p = 1024: 0.89x the
# time at T = 1024, 0.93x at 512, the same at 256, 1.4x at T = 128 with p = 768).
GHOST_BLOCK = 64
GHOST_BLOCK_LONG = 128
GHOST_LONG_POSITIONS = 512

# Choosing ghost vs instantiation by multiply-adds alone misjudges instantiation: writing,
# reading and reducing the [B, p, d] per-sample gradients and the B small GEMMs cost more than
# they count. Measured on a 2-thread CPU (Linear d = p = 256, B = 32, compiled): instantiating
# at T = 128 takes 2.7x the blocked ghost norm's time for 1.33x its multiply-adds; at T = 1024 it
# is 5x faster for 3.8x fewer. Charging each gradient element this many multiply-adds fits both.
INSTANTIATE_OVERHEAD = 128

# A convolution's Gram of input positions ([P, P] per sample and group) is allowed up to this
# many times the size of the im2col rows it replaces ([L, C K]).
GRAM_MEMORY_FACTOR = 4


def ghost_block(t: int) -> int:
    """The ghost norm's block size at ``t`` positions."""
    return GHOST_BLOCK_LONG if t >= GHOST_LONG_POSITIONS else GHOST_BLOCK


def ghost_cost(t: int, d: int, p: int, block: int | None = None) -> int:
    """Multiply-adds per sample of the blocked ghost norm: block rows k cover T - k columns
    (blocks of ``ghost_block(t)`` positions unless ``block`` is given)."""
    block = ghost_block(t) if block is None else block
    return sum(min(block, t - k) * (t - k) for k in range(0, t, block)) * (d + p)


def instantiated_cost(positions: int, p: int, d: int) -> int:
    """Time model of instantiating ``G_i`` [p, d] from ``positions`` rows (the FLOPs are
    ``positions * p * d``)."""
    return (positions + INSTANTIATE_OVERHEAD) * p * d


def gemm_strategy(t: int, d: int, p: int, *, rank_one: bool = True) -> tuple[Strategy, int]:
    """The cheaper strategy for a GEMM-like site and its multiply-adds per sample."""
    if rank_one and t == 1:
        return Strategy.RANK_ONE, d + p
    if ghost_cost(t, d, p) < instantiated_cost(t, p, d):
        return Strategy.GHOST, ghost_cost(t, d, p)
    return Strategy.INSTANTIATE, t * p * d


def position_gram_cost(windowed: int, positions: int, c: int, p: int, kernel: int) -> int:
    """A convolution's ghost norm from the Grams of positions (per group, per sample): the
    input's ``windowed`` (padded, read) positions of ``c`` channels, the ``positions`` outputs of
    ``p`` channels, and the ``kernel`` shifted sums of the input Gram."""
    return windowed * windowed * c + positions * positions * (p + kernel)


def conv_strategy(positions: int, c: int, p: int, kernel: int,
                  windowed: int | None) -> tuple[Strategy, int]:
    """The cheapest of a convolution group's strategies, by complete cost, and the multiply-adds
    per sample of its norm: the ghost norm of im2col's ``[positions, c * kernel]`` rows, the
    ghost norm from the Grams of ``windowed`` input positions (``None``: not available; only
    while that Gram is at most ``GRAM_MEMORY_FACTOR`` times the size of im2col's rows), each
    plus its clipped sum (one weight-gradient convolution of ``positions * p * d``), or the
    instantiated ``[p, c * kernel]`` gradient (charged as in :func:`gemm_strategy`), whose
    clipped sum is a weighted sum of what it already holds."""
    d = c * kernel
    clipped = positions * p * d
    ghost = ghost_cost(positions, d, p)
    options = [(ghost + clipped, Strategy.GHOST, ghost),
               (instantiated_cost(positions, p, d), Strategy.INSTANTIATE, positions * p * d)]
    if windowed is not None and windowed ** 2 <= GRAM_MEMORY_FACTOR * positions * d:
        gram = position_gram_cost(windowed, positions, c, p, kernel)
        options.append((gram + clipped, Strategy.GHOST_GRAM, gram))
    _, strategy, cost = min(options, key=lambda o: o[0])
    return strategy, cost


def max_ghost_positions(d: int, p: int, limit: int = 1 << 20) -> int:
    """The largest T at which the ghost norm is the cheaper one (0: never): a site whose T
    varies per call chooses by this threshold in the graph (``Strategy.BY_LENGTH``)."""
    lo, hi = 0, limit  # ghost wins for T <= answer: the costs cross once (T^2 against T)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ghost_cost(mid, d, p) < instantiated_cost(mid, p, d):
            lo = mid
        else:
            hi = mid - 1
    return lo


def gemm_plan(t: int, d: int, p: int, *, dynamic: bool) -> tuple[Strategy, int, int]:
    """``gemm_strategy`` for a site whose positions ``t`` may vary per call (``dynamic``; ``t``
    is the trace's): the strategy, its multiply-adds at ``t`` and the ghost threshold."""
    if not dynamic:
        return (*gemm_strategy(t, d, p), 0)
    threshold = max_ghost_positions(d, p)
    if threshold < 2:
        return Strategy.INSTANTIATE, t * p * d, 0
    cost = ghost_cost(t, d, p) if t <= threshold else t * p * d
    return Strategy.BY_LENGTH, cost, threshold


def embedding_cost(t: int, d: int) -> int:
    """The embedding's ghost norm: ``[x_t = x_t'] <g_t, g_t'>`` over T^2 position pairs."""
    return t * t * d


def tie_cross_cost(t_embedding: int, t_linear: int, d: int) -> int:
    """The cross term of tied input/output embeddings: ``<e_t, a_s>`` for every pair."""
    return t_embedding * t_linear * d


def positions(shape: tuple) -> int:
    """T: the positions of a ``[B, *, d]`` shape (every dim between batch and last)."""
    return math.prod(shape[1:-1])


def plan_instantiated(sites: list[Site], strategy: Strategy) -> None:
    """Per-sample gradients instantiated: the cost is their size per sample."""
    for s in sites:
        s.strategy = strategy
        s.cost = sum(per_sample_numel(s.shapes[r]) for r in s.params)
