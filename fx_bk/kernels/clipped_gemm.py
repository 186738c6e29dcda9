"""``fx_bk::clipped_gemm``: a Linear site's clipped weight gradient, ``sum_i c_i g_i^T a_i``.

``a: [B, T, d]``, ``g: [B, T, p]``, ``c: [B]`` -> ``[p, d]`` (``[d, p]`` with ``transposed``,
the ``x @ W`` layout). The sum is bilinear, so the clip factors go on whichever operand has fewer
elements per sample (``a`` for an LM head, whose ``g`` has V columns); then one GEMM over the
``B T`` rows: ``(c g)^T a`` or ``g^T (c a)``. Used for sites over several positions (T > 1); a
site with one position per sample keeps its GEMM in the graph (``LinearRule._clipped_rows``),
where the scaling fuses into the kernel that produces ``g``: on the benchmark MLP (five such
sites, 20 ms steps) this op measured 1.01-1.16x the step time.

A sample with ``c_i = 0`` (a skipped non-finite sample, or one over the bound under global
clipping) must add exactly zero, and ``0 * NaN`` is NaN: its rows are zeroed in both operands.
On CPU that pass runs only when some ``c_i`` is zero (reading ``c`` costs nothing there); on
other devices always, as reading ``c`` would wait for the device.

Operands in a narrower dtype than ``c`` are scaled in ``c``'s dtype and rounded once; the GEMM
runs in the operands' dtype and the result keeps it. fx_bk's rules pass float32 operands under
autocast too: rounding ``c g`` and the sum to bf16 lets one sample's contribution exceed the
bound (NOTE [clipped GEMM dtype], ``fx_bk/rules/linear.py``).

Opaque on purpose: in the graph, the scalings and masks of different sites were fused
horizontally into Inductor kernels that differed from layer to layer, each compiled as its own
C++ file at the first call (the benchmark encoder's backward: 18 distinct kernels, 14 with this
op; first call 48 -> 40 s), a dozen traced ops per site for the joint trace, and the mask on the
unscaled operand a pass of its own at every step.
"""

from __future__ import annotations

import math

import torch

from .flops import register_flops


def scale_goes_to_g(x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the clip factors go on the output gradient ``g`` rather than the input ``x`` of
    a clipped weight gradient ``sum_i c_i W(x_i, g_i)`` (bilinear in the two): on whichever has
    fewer elements per sample, ``g`` on a tie. A static choice (shapes only)."""
    return math.prod(g.shape[1:]) <= math.prod(x.shape[1:])


def scaled_samples(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c_i x_i`` (batch dim 0), in ``c``'s dtype and rounded once to ``x``'s."""
    cv = c.reshape(-1, *[1] * (x.dim() - 1))
    if x.dtype == c.dtype:
        return x * cv
    return (x.to(c.dtype) * cv).to(x.dtype)


def masked_if_skipped(c: torch.Tensor, *operands: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``operands`` with the samples whose ``c_i = 0`` set to exactly zero: on CPU only when
    there is such a sample (reading ``c`` costs nothing there), elsewhere always (reading it
    would wait for the device)."""
    if c.device.type == "cpu" and bool(c.all()):
        return operands
    keep = c != 0
    return tuple(torch.where(keep.reshape(-1, *[1] * (t.dim() - 1)), t, 0) for t in operands)


def _clipped_gemm(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor,
                  transposed: bool) -> torch.Tensor:
    if scale_goes_to_g(a, g):  # per sample: T p against T d
        g = scaled_samples(g, c)
    else:
        a = scaled_samples(a, c)
    a, g = masked_if_skipped(c, a, g)
    a = a.reshape(-1, a.shape[-1])  # [B T, d]
    g = g.reshape(-1, g.shape[-1])  # [B T, p]
    return a.t() @ g if transposed else g.t() @ a


def _fake(a, g, c, transposed):
    torch._check(a.shape[0] == g.shape[0] and a.shape[1] == g.shape[1]
                 and c.shape[0] == a.shape[0])
    d, p = a.shape[-1], g.shape[-1]
    return a.new_empty((d, p) if transposed else (p, d))


# Defined with torch.library.Library rather than the custom_op decorator: its Python wrapper
# costs about 19 us per call against 3 us here, and the op runs once per Linear site per step.
_LIB = torch.library.Library("fx_bk", "FRAGMENT")
_LIB.define("clipped_gemm(Tensor a, Tensor g, Tensor c, bool transposed) -> Tensor")
_LIB.impl("clipped_gemm", _clipped_gemm, "CompositeExplicitAutograd")
torch.library.register_fake("fx_bk::clipped_gemm", _fake, lib=_LIB)
clipped_gemm = torch.ops.fx_bk.clipped_gemm.default


def _flops(a_shape, g_shape, c_shape, transposed, **kwargs) -> int:
    """2 per multiply-add of the GEMM (the scaling is elementwise)."""
    b, t, d = a_shape
    return 2 * b * t * d * g_shape[-1]


register_flops(torch.ops.fx_bk.clipped_gemm, _flops)
