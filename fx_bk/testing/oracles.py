"""Per-sample oracles: what ``p.grad`` must hold after an fx_bk backward, computed without fx_bk.

* :func:`loop_clipped_sum`: one forward/backward per sample (any model, any loss).
* :func:`vmap_clipped_sum`: ``torch.func.vmap`` of ``grad`` (models vmap can run).
* :func:`opacus_clipped_sum`: what Opacus 1.6 ghost clipping leaves in ``p.grad`` (two backward
  passes; only where Opacus is right: no tied weights, no ``padding_idx`` tokens, …).

The clip factor is written out here, independently of ``fx_bk.clipping``. Compared with
:func:`max_rel_err`: ``max|a - b| / max|b|`` per parameter, the worst one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import grad, vmap

from fx_bk.module_state import swapped_state

CLIP_EPS = 1e-6  # Opacus's C_i = min(1, R / (||g_i|| + 1e-6))
AUTOMATIC_GAMMA = 0.01  # Bu et al.'s automatic clipping: C_i = R / (||g_i|| + 0.01)


def clip_factor(norm: torch.Tensor, max_grad_norm: float, clipping: str = "abadi"):
    """The clip factor of per-sample norms (a tensor of any shape)."""
    if clipping == "abadi":
        return (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    if clipping == "automatic":
        return max_grad_norm / (norm + AUTOMATIC_GAMMA)
    if clipping == "global":
        return (norm <= max_grad_norm).to(norm.dtype)
    raise ValueError(f"unknown clipping {clipping!r}")


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


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_sample_grads(model: nn.Module, x, y, loss_fn=nn.functional.cross_entropy) -> dict:
    """Explicit per-sample gradients ``[B, *p.shape]`` of each trainable parameter (vmap)."""
    params = {n: p.detach() for n, p in trainable(model)}

    def loss_one(p, xi, yi):
        with swapped_state(model, p):
            out = model(xi.unsqueeze(0))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def vmap_clipped_sum(model: nn.Module, x, y, max_grad_norm: float,
                     loss_fn=nn.functional.cross_entropy, clipping: str = "abadi") -> dict:
    """``sum_i C_i grad l_i`` with per-sample gradients from :func:`per_sample_grads`."""
    g = per_sample_grads(model, x, y, loss_fn)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    c = clip_factor(norms, max_grad_norm, clipping)
    return {n: torch.einsum("b,b...->...", c, v) for n, v in g.items()}


def loop_clipped_sum(model: nn.Module, x, per_sample_loss: Callable, max_grad_norm: float,
                     loss_of: Callable | None = None, clipping: str = "abadi") -> dict:
    """``sum_i C_i grad l_i``, one forward/backward per sample. The loss of sample ``xi`` (a
    batch of one) is ``loss_of(model, xi)``, by default ``per_sample_loss(model(xi), xi)``
    summed. ``x`` is a tensor, or a tuple of tensors sliced together along dim 0."""
    loss_of = loss_of or (lambda m, xi: per_sample_loss(m(xi), xi).sum())
    params = trainable(model)
    total = {n: torch.zeros_like(p) for n, p in params}
    inputs = x if isinstance(x, tuple) else (x,)
    for i in range(inputs[0].shape[0]):
        rows = tuple(t[i : i + 1] for t in inputs)
        loss = loss_of(model, rows if isinstance(x, tuple) else rows[0])
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True,
                                    materialize_grads=True)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        c = clip_factor(norm, max_grad_norm, clipping).item()
        for (n, _), g in zip(params, grads):
            total[n] += c * g
    return total


def opacus_clipped_sum(model: nn.Module, x, y, max_grad_norm: float, reduction: str) -> dict:
    """What Opacus 1.6 ghost clipping (two backward passes) leaves in ``p.grad`` (cross-entropy
    loss; the model is copied)."""
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
    return {n: p.grad.detach().clone() for n, p in trainable(m)}


def fx_bk_grads(bk, model: nn.Module, x, y, reduction: str) -> dict:
    """One forward + backward (cross entropy) through the fx_bk module; ``p.grad`` by name."""
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(bk(x), y, reduction=reduction)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in trainable(model)}
