"""``fx_bk.transform``: the public entry point."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch

from .config import BKConfig
from .distributed import check_not_sharded
from .errors import ConfigError, Problem, raise_if_any
from .runtime import BKModule


def transform(
    model: torch.nn.Module,
    *,
    max_grad_norm: float | Sequence[float],
    loss_reduction: str = "mean",
    clipping: str = "abadi",
    clipping_style: str | Sequence[Sequence[str]] = "all-layer",
    nonfinite: str = "skip",
    unbatched: Sequence[str] = (),
    dynamic: bool | None | Mapping[str, int | Sequence[int]] = None,
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

    ``clipping``: "abadi" (above), "automatic" (``C_i = R / (||grad l_i|| + 0.01)``) or "global"
    (``C_i = 1`` if ``||grad l_i|| <= R`` else 0). ``clipping_style``: "all-layer" (one norm),
    "per-layer" (one norm and bound per module that owns parameters) or a list of groups of
    parameter names (``model.named_parameters()`` names), each with its own norm; then
    ``max_grad_norm`` may be one bound per group.

    ``nonfinite``: a sample whose gradient norm is NaN or infinite contributes exactly zero and
    a warning names it ("skip"; ``module.nonfinite_samples`` counts them), or the backward
    raises ``fx_bk.NonFiniteSampleError`` ("raise").

    ``unbatched``: names of ``forward`` arguments whose tensors are shared by all samples (a
    table, class weights): never taken as per-sample data. Any other tensor whose dim 0 equals
    the batch size is batched; an argument that is batched in one call and not in another is an
    error asking for this declaration.

    ``dynamic``: which sizes besides the batch one trace serves (a sequence length). ``None``
    (default): a dim whose size changes between calls is traced symbolically from its second
    size on, as ``torch.compile`` does (two traces in all). A mapping from ``forward`` argument
    names to dims (``{"input_ids": 1, "attention_mask": 1}``) makes those dims symbolic from the
    first call (one trace); Dynamo's ``mark_dynamic(x, dim)`` on an input does the same.
    ``False``: one trace per size.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = BKConfig(
        max_grad_norm=tuple(max_grad_norm) if isinstance(max_grad_norm, (list, tuple))
        else max_grad_norm,
        loss_reduction=loss_reduction,
        clipping=clipping,
        clip_groups=clip_groups(model, clipping_style),
        nonfinite=nonfinite,
        unbatched=_forward_arguments(model, unbatched),
        dynamic_dims=_dynamic_dims(model, dynamic),
        automatic_dynamic=dynamic is not False,
    )
    check_not_sharded(model)
    raise_if_any(check_module_tree(model))
    return BKModule(model, config)


def _dynamic_dims(model: torch.nn.Module, dynamic) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if dynamic is None or isinstance(dynamic, bool):
        return ()
    if not isinstance(dynamic, Mapping):
        raise ConfigError(f"dynamic must be None, False or a mapping from forward argument "
                          f"names to dims ({{'input_ids': 1}}), got {dynamic!r}")
    names = _forward_arguments(model, list(dynamic), what="dynamic")
    out = []
    for name in names:
        dims = dynamic[name]
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                           for d in dims):
            raise ConfigError(f"dynamic[{name!r}] must be dims >= 1 of that argument (dim 0 "
                              f"is the batch, always dynamic), got {dynamic[name]!r}")
        out.append((name, dims))
    return tuple(out)


def _forward_arguments(model: torch.nn.Module, names, what: str = "unbatched") -> tuple[str, ...]:
    """``names``, checked against ``model.forward``'s parameters."""
    names = (names,) if isinstance(names, str) else tuple(names)
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return names
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ConfigError(f"{what} names {unknown}, which are not arguments of "
                          f"{type(model).__name__}.forward{inspect.signature(model.forward)}")
    return names


def check_module_tree(model: torch.nn.Module) -> list[Problem]:
    """Problems visible from the module tree alone."""
    problems = []
    for name, mod in model.named_modules():
        if isinstance(mod, BKModule):
            problems.append(Problem(
                "already-transformed",
                f"module '{name or '<root>'}' is already an fx_bk module (fx_bk.transform was "
                f"applied to it); transform the plain model once, at the top: "
                f"fx_bk.transform(model, ...)",
            ))
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


def clip_groups(model: torch.nn.Module, style) -> tuple[tuple[str, ...], ...] | None:
    """Resolve ``clipping_style`` to a partition of the trainable parameter names."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(style, str):
        if style == "all-layer":
            return None
        if style == "per-layer":
            by_module: dict[str, list[str]] = {}
            for n in trainable:
                by_module.setdefault(n.rpartition(".")[0], []).append(n)
            return tuple(tuple(g) for g in by_module.values())
        raise ConfigError(
            f"clipping_style must be 'all-layer', 'per-layer' or a list of groups of parameter "
            f"names, got {style!r}"
        )
    groups = tuple(tuple(g) for g in style)
    seen: dict[str, int] = {}
    for k, group in enumerate(groups):
        if isinstance(group, str) or not group:
            raise ConfigError(
                f"clipping_style group {k} must be a non-empty list of parameter names, "
                f"got {group!r}"
            )
        for n in group:
            if n not in trainable:
                raise ConfigError(
                    f"clipping_style group {k} names {n!r}, which is not a trainable parameter "
                    f"of {type(model).__name__} (names as in model.named_parameters())"
                )
            if n in seen:
                raise ConfigError(
                    f"parameter {n!r} is in clipping groups {seen[n]} and {k}; each trainable "
                    f"parameter must be in exactly one group"
                )
            seen[n] = k
    missing = [n for n in trainable if n not in seen]
    if missing:
        raise ConfigError(
            f"trainable parameters {missing} are in no clipping group; add them to a group "
            f"(or freeze them with requires_grad_(False))"
        )
    return groups
