"""Normalization layers with an elementwise affine: ``s = x_hat * w (+ b)``.

``x_hat`` is the op's normalized input (recomputed here without the affine transform), ``w`` and
``b`` are broadcast along some dims of ``x``. Per-sample gradients are as small as the
parameters, so they are instantiated (strategy ``instantiate``):

    w_i = sum g_i * x_hat_i,   b_i = sum g_i      over the dims the parameters are broadcast along

norm ``||w_i||^2 + ||b_i||^2``, clipped sum ``sum_i c_i w_i``. Group norm's come from the two
per-channel sums its backward computes anyway (``ds = sum g_i * x_i``, ``db = sum g_i``;
``fx_bk/backward_decompositions.py``), ``w_i = (ds - db * mean) * rstd``, so the joint graph
holds each sum once (:func:`_group_norm_grads`). One row of :data:`AFFINE_NORMS` per op:

| op | x | parameters | summed over |
|---|---|---|---|
| layer_norm | ``[B, *, *N]`` | ``N`` | ``*`` (between batch and ``N``) |
| group_norm | ``[B, C, *S]`` | ``[C]`` | ``S`` |
| instance_norm | ``[B, C, *S]`` | ``[C]`` | ``S`` (running statistics in eval mode rejected) |
| rms_norm | ``[B, *, *N]`` | ``N`` (weight only) | ``*`` |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fx_bk.backward_decompositions import group_norm_sample_grads, group_norm_sums
from fx_bk.site import Site

from .base import Rule, register_rule

aten = torch.ops.aten


@dataclass(frozen=True)
class AffineNorm:
    """One normalization op: how to recompute ``x_hat`` and which dims its affine spans."""

    name: str
    op: object
    param_args: tuple[str, ...]
    normalize: Callable  # (x, const_args) -> x_hat
    summed_dims: Callable  # (x, const_args) -> dims of x the parameters are broadcast along
    strategies: str
    reject: Callable | None = None  # (const_args) -> reason or None
    trailing: bool = False  # normalizes the last dims only: the leading ones are rows
    # (g, x, const_args) -> (w_i, b_i) from the op's own backward sums, instead of normalize
    grads_from_sums: Callable | None = None


def _trailing(args) -> int:
    return len(args["normalized_shape"])


def _group_norm_grads(g, x, args):
    """Per-sample ``[B, C]`` weight and bias gradients of ``group_norm`` from the sums its input
    gradient needs, written as ATen's ``native_group_norm_backward`` decomposition writes them
    (``ds``, ``db``), with the statistics of the forward's normalization (the same
    ``native_group_norm`` on the same input). The weight gradient is PyTorch's own ``dgamma``
    formula, one sample at a time."""
    n, c, groups = x.shape[0], x.shape[1], args["num_groups"]
    hw = x[0, 0].numel()
    ds, db = group_norm_sums(g, x)
    _, mean, rstd = aten.native_group_norm(x, None, None, n, c, hw, groups, args.get("eps", 1e-5))
    return group_norm_sample_grads(ds, db, mean, rstd, groups)


AFFINE_NORMS = (
    AffineNorm(
        "layer_norm", aten.layer_norm.default, ("weight", "bias"),
        lambda x, a: F.layer_norm(x, list(a["normalized_shape"]), None, None, a.get("eps", 1e-5)),
        lambda x, a: tuple(range(1, x.dim() - _trailing(a))),
        "instantiated (weight and/or bias)", trailing=True,
    ),
    AffineNorm(
        "group_norm", aten.group_norm.default, ("weight", "bias"),
        lambda x, a: F.group_norm(x, a["num_groups"], None, None, a.get("eps", 1e-5)),
        lambda x, a: tuple(range(2, x.dim())),
        "instantiated (weight and/or bias)", grads_from_sums=_group_norm_grads,
    ),
    AffineNorm(
        "instance_norm", aten.instance_norm.default, ("weight", "bias"),
        lambda x, a: F.instance_norm(x, eps=a.get("eps", 1e-5)),
        lambda x, a: tuple(range(2, x.dim())),
        "instantiated (weight and/or bias); no running statistics",
        reject=lambda a: None if a.get("use_input_stats", True) else (
            "instance norm with running statistics in eval mode is not supported"),
    ),
    AffineNorm(
        "rms_norm", aten.rms_norm.default, ("weight",),
        lambda x, a: F.rms_norm(x, list(a["normalized_shape"]), None, a.get("eps")),
        lambda x, a: tuple(range(1, x.dim() - _trailing(a))),
        "instantiated", trailing=True,
    ),
)


class AffineNormRule(Rule):
    """The rule of one :class:`AffineNorm` row."""

    tensor_args = ("input",)
    rows_independent = True  # every norm here normalizes within one row of dim 0

    def __init__(self, spec: AffineNorm):
        self.spec = spec
        self.name, self.param_args, self.strategies = spec.name, spec.param_args, spec.strategies
        self.folds_batch = spec.trailing

    def core_dims(self, site: Site) -> int:
        return _trailing(site.const_args)

    def validate(self, site: Site) -> str | None:
        return self.spec.reject(site.const_args) if self.spec.reject else None

    def per_sample_grads(self, value):
        x, args, params = value.tensors["input"], value.site.const_args, value.site.params
        if self.spec.grads_from_sums is not None:
            w, b = self.spec.grads_from_sums(value.grad, x, args)
        else:
            dims = self.spec.summed_dims(x, args)

            def summed(t):
                return t.sum(dims) if dims else t

            w = summed(value.grad * self.spec.normalize(x, args)) if "weight" in params else None
            b = summed(value.grad) if "bias" in params else None
        return {params[role]: t for role, t in (("weight", w), ("bias", b)) if role in params}


for _spec in AFFINE_NORMS:
    register_rule(_spec.op)(AffineNormRule(_spec))
