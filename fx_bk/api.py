"""``fx_bk.transform``: the public entry point."""

from __future__ import annotations

import torch

from .config import BKConfig
from .errors import ConfigError, Problem, raise_if_any
from .runtime import BKModule


def transform(
    model: torch.nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean"
) -> BKModule:
    """Return a module whose backward leaves per-sample clipped gradient sums in ``p.grad``.

    After ``loss.backward()`` every trainable parameter ``p`` holds ``sum_i C_i grad_p l_i`` with
    ``C_i = min(1, max_grad_norm / (||grad l_i|| + 1e-6))``, ``||.||`` over all trainable
    parameters (one forward, one backward). ``loss_reduction`` says how the loss combines
    per-sample losses ("mean" or "sum"). The returned module shares ``model``'s parameters and
    keeps its forward's call signature; the BK graphs are traced at the first call (one trace per
    input signature serves every batch size). Problems that make per-sample clipping impossible
    (unsupported ops on trainable parameters, BatchNorm, ops mixing samples) are raised together,
    at ``transform`` or at the first call, before any gradient is produced.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = BKConfig(max_grad_norm=max_grad_norm, loss_reduction=loss_reduction)
    raise_if_any(check_module_tree(model))
    return BKModule(model, config)


def check_module_tree(model: torch.nn.Module) -> list[Problem]:
    """Problems visible from the module tree alone."""
    problems = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            problems.append(Problem(
                "batch-norm",
                f"module '{name or '<root>'}' is {type(mod).__name__}: batch statistics mix "
                f"samples, so no per-sample gradient exists (even with frozen affine "
                f"parameters). Replace it with nn.GroupNorm or nn.LayerNorm",
            ))
    if not any(p.requires_grad for p in model.parameters()):
        problems.append(Problem(
            "no-trainable-parameters",
            f"{type(model).__name__} has no parameter with requires_grad=True; there is "
            f"nothing to train privately",
        ))
    return problems
