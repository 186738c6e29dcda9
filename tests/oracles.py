"""The two references fx_bk is compared with, and the comparison metric."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

CLIP_EPS = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (elementwise rtol fails on mathematically zero entries)."""
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 0 else 1.0)


def max_rel_err(got: dict, ref: dict) -> float:
    """Worst per-parameter ``rel_err``. A parameter whose true gradient is mathematically zero
    (e.g. an attention key bias: softmax ignores it) has only rounding noise as reference, so
    each denominator is at least 1e-3 of the largest gradient entry of the model."""
    assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
    floor = 1e-3 * max(r.abs().max().item() for r in ref.values())
    return max(
        (got[n] - ref[n]).abs().max().item() / max(ref[n].abs().max().item(), floor, 1e-300)
        for n in ref
    )


def per_sample_grads(model: nn.Module, x, y, loss_fn=nn.functional.cross_entropy) -> dict:
    """Explicit per-sample gradients ``[B, *p.shape]`` of each trainable parameter (vmap)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),), strict=False)
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def vmap_clipped_sum(model: nn.Module, x, y, max_grad_norm: float) -> dict:
    """``sum_i C_i grad l_i`` with ``C_i = min(1, R / (||grad l_i|| + 1e-6))``."""
    g = per_sample_grads(model, x, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    c = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", c, v) for n, v in g.items()}


def opacus_clipped_sum(model: nn.Module, x, y, max_grad_norm: float, reduction: str) -> dict:
    """What Opacus 1.6 ghost clipping (two backward passes) leaves in ``p.grad``."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    m = copy.deepcopy(model)
    gsm = GradSampleModuleFastGradientClipping(
        m, batch_first=True, loss_reduction=reduction, max_grad_norm=max_grad_norm,
        use_ghost_clipping=True,
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=len(x),
        loss_reduction=reduction,
    )
    criterion = DPLossFastGradientClipping(
        gsm, opt, nn.CrossEntropyLoss(reduction=reduction), reduction
    )
    loss = criterion(gsm(x), y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def fx_bk_grads(bk, model: nn.Module, x, y, reduction: str) -> dict:
    """One forward + backward through the fx_bk module; returns ``p.grad`` by name."""
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(bk(x), y, reduction=reduction)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
