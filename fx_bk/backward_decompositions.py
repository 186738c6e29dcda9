"""The decompositions the joint trace applies to autograd's backward ops
(``passes/build_joint.py``).

* ``native_group_norm_backward`` with per-channel factors broadcast over the input's own shape:
  ``d_input = g * c1 + x * c2 + c3``, with ``c1, c2, c3`` of shape ``[N, C, 1, ...]``.
  PyTorch's decomposition (the one Inductor applies) computes it on the views
  ``[N, groups, C / groups, HW]`` of ``g`` and ``x`` and reshapes the result back. Inductor gives
  a convolution's tensors the channels-last layout on CPU; as long as the input gradient has
  one reader, the convolution's backward, Inductor computes it straight into that layout. A
  BK program reads it twice (the convolution's input gradient and its per-sample weight
  gradients), so Inductor stores it in the layout of the grouped view (contiguous) first and
  copies it into channels last after: 8 MB written, read and written again per 32-channel
  32×32 convolution of the benchmark CNN at B = 64. Written on the input's shape, the result
  is stored once, in the layout the convolution reads.
* On CPU the three factors are expanded from groups to channels by one matrix product with the
  0/1 group-membership matrix (:func:`_channel_factors`), not by indexing inside the
  elementwise loop: Inductor's CPU backend leaves a kernel scalar once non-contiguous loads
  are 12% of its ops, and the per-group factors, read at ``channel // (C / groups)``, were 4
  of the loop's ~25 loads, so the loop over the whole input ran scalar.

The per-channel sums (``ds = sum g x``, ``db = sum g`` over the spatial dims) come from
:func:`group_norm_sums` and the weight and bias gradients from :func:`group_norm_sample_grads`,
which the group norm rule also calls for the per-sample gradients, so the joint graph holds each
sum once.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def group_norm_sums(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ds, db)``: ``sum g * x`` and ``sum g`` per sample and channel (``[N, C]``), over the
    spatial dims of ``[N, C, *S]``."""
    spatial = list(range(2, x.dim()))
    if not spatial:  # [N, C]: nothing to sum over (``sum(dim=[])`` would sum everything)
        return g * x, g
    return (g * x).sum(spatial), g.sum(spatial)


def _per_channel(t: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """``[N, groups]`` -> ``[N, C]``: each group's value for each of its channels."""
    n = t.shape[0]
    return t.unsqueeze(-1).expand(n, groups, per_group).reshape(n, groups * per_group)


def _channel_factors(factors: tuple[torch.Tensor, ...], groups: int,
                     per_group: int) -> tuple[torch.Tensor, ...]:
    """``[N, groups]`` factors -> ``[N, C]`` each, every channel its group's value. On CPU one
    matrix product of the stacked factors with the 0/1 group-membership matrix ``[groups, C]``:
    exact (one nonzero term per entry, for finite factors; a non-finite factor makes every
    channel of its own sample non-finite, as ``0 * inf`` is NaN), and an extern GEMM whose
    result Inductor stores, so the elementwise loop reads the factors contiguously along the
    channels and is vectorized (the benchmark CNN's 32-channel 32x32 group norm backward at
    B = 64: 6.5 -> 1.8 ms). On other devices expanded inside the loop as before (Triton's
    kernels are not subject to that threshold; not measured there)."""
    first = factors[0]
    if first.device.type != "cpu":
        return tuple(_per_channel(t, groups, per_group) for t in factors)
    n, k, channels = first.shape[0], len(factors), groups * per_group
    member = torch.arange(channels, device=first.device) // per_group
    membership = (member == torch.arange(groups, device=first.device).unsqueeze(1))
    stacked = torch.stack(factors, 1).reshape(n * k, groups)
    return (stacked @ membership.to(stacked.dtype)).reshape(n, k, channels).unbind(1)


def group_norm_sample_grads(ds: torch.Tensor, db: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``[N, C]`` weight and bias gradients of ``group_norm`` from its sums ``ds``,
    ``db`` and its statistics ``mean``, ``rstd`` (``[N, groups]``): PyTorch's ``dgamma``
    formula one sample at a time (the weight gradient is their sum over the batch)."""
    per_group = ds.shape[1] // groups
    mean_c, rstd_c = (_per_channel(t, groups, per_group) for t in (mean, rstd))
    return (ds - db * mean_c) * rstd_c, db


def group_norm_backward(grad_out, input, mean, rstd, gamma, N, C, HxW, group, output_mask):
    """``aten.native_group_norm_backward``: the same formulas as PyTorch's decomposition, with
    the per-channel factors broadcast over ``[N, C, *S]`` instead of a grouped view."""
    dtype = input.dtype
    if dtype in (torch.float16, torch.bfloat16):  # as the decomposition: opmath, cast back
        grad_out, input = grad_out.float(), input.float()
        gamma = None if gamma is None else gamma.float()
    per_group = C // group
    ds, db = group_norm_sums(grad_out, input)
    bcast = [input.shape[0], C] + [1] * (input.dim() - 2)
    d_input = d_gamma = d_bias = None
    if output_mask[0]:
        scale = 1.0 / (HxW * per_group)
        weighted_ds, weighted_db = (ds, db) if gamma is None else (ds * gamma, db * gamma)
        ds_g = weighted_ds.reshape(-1, group, per_group).sum(2)
        db_g = weighted_db.reshape(-1, group, per_group).sum(2)
        c2 = (db_g * mean - ds_g) * rstd * rstd * rstd * scale
        c3 = -c2 * mean - db_g * rstd * scale
        c1, c2, c3 = _channel_factors((rstd, c2, c3), group, per_group)
        if gamma is not None:
            c1 = c1 * gamma
        d_input = (grad_out * c1.reshape(bcast) + input * c2.reshape(bcast)
                   + c3.reshape(bcast)).to(dtype)
    if output_mask[1] or output_mask[2]:
        per_sample_w, per_sample_b = group_norm_sample_grads(ds, db, mean, rstd, group)
        d_gamma = per_sample_w.sum(0).to(dtype) if output_mask[1] else None
        d_bias = per_sample_b.sum(0).to(dtype) if output_mask[2] else None
    return d_input, d_gamma, d_bias


BACKWARD_DECOMPOSITIONS = {aten.native_group_norm_backward.default: group_norm_backward}
