"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over an fx_bk module, and the checks that keep
every other way of combining them from giving a wrong gradient.

What works (2 gloo processes on CPU, tested in ``tests/test_fsdp.py``; ``docs/fsdp.md``): the fx_bk
module sharded as ONE unit, at its root, ``fully_shard(fx_bk.transform(model, ...))``. FSDP's
pre-forward hook on that module gathers every parameter before ``BKModule.forward`` reads them,
so fx_bk traces and runs on whole, plain parameters exactly as without FSDP; the clipped sums
it leaves in the unsharded ``p.grad`` are reduce-scattered by FSDP (averaged over the W ranks,
as DDP does), so each rank's sharded ``p.grad`` is its shard of ``(sum over all ranks'
samples) / W``: ``fx_bk.PrivacyEngine``'s distributed arithmetic (noise ``sigma R / W`` from
one shared generator, division by the per-rank expected batch ``E / W``) applies unchanged.

What cannot work: ``fully_shard`` on submodules of the wrapped model (per layer). fx_bk traces
the whole forward as one program and computes every clipped sum in one backward, so it needs
every parameter whole at once; FSDP's per-layer hooks would run inside that trace and hand it
sharded ``DTensor`` parameters. Such a model is refused with ``ConfigError`` at ``transform``
and at every call (``check_not_sharded``); per-layer sharding would also save no memory
over root-level sharding: the BK program's forward and backward are one autograd node whose
inputs are all the parameters.

A layer-0 module (it imports only ``errors`` at module level; ``torch.distributed`` is imported
only once a process group exists): ``fx_bk.api`` and ``fx_bk.runtime`` call
``check_not_sharded``, and ``fully_shard`` imports the runtime when called.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _dtensor_type():
    """``DTensor``, or None where none can exist (no process group: nothing is imported)."""
    if not _initialized():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _fsdp_module_type():
    if not _initialized():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


_HOW = ("apply fully_shard to the fx_bk module only, as one unit: "
        "fx_bk.distributed.fully_shard(fx_bk.transform(model, ...), optimizer) (build the model "
        "again without the inner fully_shard calls; FSDP cannot undo them)")


def sharded_submodules(model: torch.nn.Module) -> list[str]:
    """Paths of the modules of ``model`` (itself included: ``"<root>"``) that
    ``torch.distributed.fsdp.fully_shard`` was applied to."""
    fsdp_module = _fsdp_module_type()
    if fsdp_module is None:
        return []
    return [name or "<root>" for name, m in model.named_modules()
            if isinstance(m, fsdp_module)]


def check_not_sharded(model: torch.nn.Module, params=None) -> None:
    """Raise ``ConfigError`` when ``fully_shard`` was applied inside ``model`` (the model
    ``fx_bk.transform`` wraps) or one of ``params`` (default: its parameters) is a ``DTensor``
    (a shard: FSDP per layer, tensor parallelism). At ``transform`` and at every call of the fx_bk
    module (``fully_shard`` may come after ``transform``): one ``isinstance`` per parameter and
    module."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return
    params = list(model.parameters()) if params is None else params
    modules = sharded_submodules(model)
    if not modules and not any(isinstance(p, dtensor) for p in params):
        return
    names = [n for n, p in model.named_parameters() if isinstance(p, dtensor)]
    raise ConfigError(_message(type(model).__name__, modules, names))


def _message(model: str, modules: list[str], params: list[str]) -> str:
    where = (f"fully_shard (FSDP2) was applied to {modules} inside the fx_bk-wrapped {model}"
             if modules else f"parameters {params[:8]} of {model} are sharded DTensors "
             f"(FSDP or tensor parallelism)")
    return (f"fx_bk: {where}. fx_bk traces the whole forward as one program and computes "
            f"every clipped sum in one backward, so it needs all parameters whole at once; "
            f"sharding inside it (per layer) cannot work (nor save memory). Instead, "
            f"{_HOW}")


def fully_shard(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                **fsdp_options):
    """``torch.distributed.fsdp.fully_shard`` for the module ``fx_bk.transform`` or
    ``fx_bk.PrivacyEngine.make_private`` returned (eager or ``torch.compile``'d), as one unit.

    FSDP replaces the module's parameters with sharded ``DTensor`` parameters; ``optimizer``
    (a plain one, or the engine's DP optimizer, built on the old parameters and never stepped)
    is pointed at the new ones, so ``make_private`` can run first, as with DDP. Returns
    ``module``. ``fsdp_options`` are ``fully_shard``'s (``mesh``, ``mp_policy``,
    ``reshard_after_forward``, ...), checked so that every trainable parameter's gradient is
    averaged over all ranks, which the engine's noise and scaling assume.

    Raises ``ConfigError``: not an fx_bk module; already sharded, or FSDP inside it;
    ``torch.distributed`` not initialized; a ``mesh`` that does not span every rank; trainable
    ``ignored_params`` (they would keep each rank's own gradient); an optimizer with state.
    """
    from .runtime import BKModule

    bk = getattr(module, "_orig_mod", module)  # torch.compile's wrapper calls this module
    if not isinstance(bk, BKModule):
        raise ConfigError(
            f"fx_bk.distributed.fully_shard takes the module fx_bk.transform or "
            f"PrivacyEngine.make_private returned, got {type(bk).__name__}: transform the "
            f"plain model first, fx_bk.distributed.fully_shard(fx_bk.transform(model, ...))"
        )
    if not _initialized():
        raise ConfigError("fx_bk.distributed.fully_shard: call "
                          "torch.distributed.init_process_group first")
    inside = sharded_submodules(bk)
    if inside == ["<root>"]:
        raise ConfigError("fx_bk.distributed.fully_shard: the module is already sharded "
                          "(fully_shard was applied to it); shard it once")
    if inside:
        check_not_sharded(bk._module)  # names the sharded submodules, says what to do
    _check_options(bk, fsdp_options)
    before = dict(bk.named_parameters())
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    torch_fully_shard(bk, **fsdp_options)
    if optimizer is not None:
        _point_optimizer(optimizer, before, dict(bk.named_parameters()))
    return module


def _check_options(bk: torch.nn.Module, options: dict) -> None:
    mesh = options.get("mesh")
    world = torch.distributed.get_world_size()
    if mesh is not None and mesh.size() != world:
        raise ConfigError(
            f"fx_bk.distributed.fully_shard: the mesh spans {mesh.size()} of the {world} ranks; "
            f"FSDP would average gradients over the mesh only, while the privacy engine scales "
            f"noise and batch size by the world size. Use a mesh over all ranks (1-D, or 2-D "
            f"replicate x shard for HSDP)"
        )
    ignored = {id(p) for p in options.get("ignored_params") or ()}
    trainable = [n for n, p in bk.named_parameters() if p.requires_grad and id(p) in ignored]
    if trainable:
        raise ConfigError(
            f"fx_bk.distributed.fully_shard: trainable parameters {trainable} are in "
            f"ignored_params: FSDP would leave their gradient on each rank unreduced (each rank "
            f"would step on its own samples only). Freeze them (requires_grad_(False)) or let "
            f"FSDP shard them"
        )


def _point_optimizer(optimizer, before: dict, after: dict) -> None:
    """Replace, in ``optimizer``'s param groups, every parameter FSDP replaced."""
    if any(optimizer.state.values()):
        raise ConfigError(
            "fx_bk.distributed.fully_shard: the optimizer already has state (it has stepped); "
            "its state is of the unsharded parameters. Shard before the first step"
        )
    if set(before) != set(after):
        raise ConfigError(f"fx_bk.distributed.fully_shard: FSDP changed the parameter names "
                          f"({sorted(set(before) ^ set(after))}); cannot update the optimizer")
    new = {id(p): after[n] for n, p in before.items()}
    for group in optimizer.param_groups:
        old = group["params"]
        group["params"] = [new.get(id(p), p) for p in old]
        for p, q in zip(old, group["params"]):
            if q is not p and hasattr(p, "summed_grad"):  # Opacus's DP optimizer's slot
                q.summed_grad = None


def check_optimizer_params(optimizer, module: torch.nn.Module) -> None:
    """Raise ``ConfigError`` when ``optimizer`` holds parameters that are no longer
    ``module``'s (``torch.distributed.fsdp.fully_shard`` replaced them after the optimizer was
    built): the step would update tensors the model no longer uses and leave the model as it
    was, with no error. Checked once ``module`` holds a ``DTensor`` parameter (sharded)."""
    dtensor = _dtensor_type()
    params = list(module.parameters()) if dtensor is not None else []
    if not any(isinstance(p, dtensor) for p in params):
        return
    current = {id(p) for p in params}
    stale = [i for group in optimizer.param_groups for i, p in enumerate(group["params"])
             if p.requires_grad and id(p) not in current]
    if stale:
        raise ConfigError(
            f"fx_bk: the optimizer holds {len(stale)} parameter(s) that are no longer the "
            f"model's (torch.distributed.fsdp.fully_shard replaces every parameter with a "
            f"sharded DTensor parameter): this step would not change the model. Shard with "
            f"fx_bk.distributed.fully_shard(module, optimizer), which points the optimizer at "
            f"the new parameters"
        )


def noise_context(params) -> contextlib.AbstractContextManager:
    """Where the DP optimizer adds noise: with sharded (``DTensor``) gradients, Opacus draws a
    plain tensor of each parameter's full shape, and ``implicit_replication`` makes every rank
    add the slice of its own shard. With the engine's shared generator each rank draws the same
    full tensor, so each coordinate receives its noise exactly once, as in one process."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()
