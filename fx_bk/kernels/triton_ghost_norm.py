"""The Triton kernel behind ``fx_bk::ghost_norm`` on CUDA (see ``ghost_norm.py``).

Grid ``(B, nb, nb)`` with ``nb = ceil(T / BLOCK_T)``; program ``(i, k, l)`` returns at once when
``l < k`` (symmetry), else computes the Gram tiles ``A = a_i[k] a_i[l]^T`` and
``Q = g_i[k] g_i[l]^T`` (``BLOCK_T x BLOCK_T``, float32 accumulators, looping over d and p in
``BLOCK_D`` columns) and adds ``w * sum(A * Q)`` to ``out[i]`` (``w = 2`` off the diagonal).
Tested on CPU under ``TRITON_INTERPRET=1`` against the PyTorch implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gram_tile(x_ptr, stride_b, stride_t, row_k, row_l, n_t, n_c, sample,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    offs_k = row_k + tl.arange(0, BLOCK_T)
    offs_l = row_l + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    base = x_ptr + sample * stride_b
    for c in range(0, n_c, BLOCK_D):
        offs_c = c + tl.arange(0, BLOCK_D)
        mask_c = offs_c[None, :] < n_c
        xk = tl.load(base + offs_k[:, None] * stride_t + offs_c[None, :],
                     mask=(offs_k[:, None] < n_t) & mask_c, other=0.0)
        xl = tl.load(base + offs_l[:, None] * stride_t + offs_c[None, :],
                     mask=(offs_l[:, None] < n_t) & mask_c, other=0.0)
        if IEEE:
            acc += tl.dot(xk, tl.trans(xl), input_precision="ieee")
        else:
            acc += tl.dot(xk, tl.trans(xl))
    return acc


@triton.jit
def _ghost_norm_kernel(a_ptr, g_ptr, out_ptr, n_t, n_d, n_p,
                       stride_ab, stride_at, stride_gb, stride_gt,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    sample = tl.program_id(0)
    k = tl.program_id(1)
    m = tl.program_id(2)
    if m >= k:
        row_k = k * BLOCK_T
        row_l = m * BLOCK_T
        aa = _gram_tile(a_ptr, stride_ab, stride_at, row_k, row_l, n_t, n_d, sample,
                        BLOCK_T, BLOCK_D, IEEE)
        gg = _gram_tile(g_ptr, stride_gb, stride_gt, row_k, row_l, n_t, n_p, sample,
                        BLOCK_T, BLOCK_D, IEEE)
        weight = tl.where(m == k, 1.0, 2.0)
        tl.atomic_add(out_ptr + sample, tl.sum(aa * gg) * weight)


def triton_ghost_norm(a: torch.Tensor, g: torch.Tensor, block_t: int = 32,
                      block_d: int = 32) -> torch.Tensor:
    """``[B, T, d], [B, T, p] -> [B]`` float32 (contiguous last dims)."""
    a, g = a.contiguous(), g.contiguous()
    b, t, d = a.shape
    p = g.shape[2]
    out = torch.zeros(b, device=a.device, dtype=torch.float32)
    if b == 0 or t == 0:
        return out
    nb = triton.cdiv(t, block_t)
    _ghost_norm_kernel[(b, nb, nb)](
        a, g, out, t, d, p, a.stride(0), a.stride(1), g.stride(0), g.stride(1),
        BLOCK_T=block_t, BLOCK_D=block_d, IEEE=a.dtype == torch.float32,
    )
    return out
