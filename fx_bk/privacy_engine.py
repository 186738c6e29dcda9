"""``fx_bk.PrivacyEngine``: Opacus's privacy engine, with fx_bk's one-backward clipping.

Shaped like ``opacus.PrivacyEngine`` so its users feel at home, and built from Opacus's own
parts: the accountant (RDP / PRV / GDP), ``DPDataLoader`` (Poisson sampling) and
``DPOptimizerFastGradientClipping`` (it expects ``p.grad`` to hold the clipped sum, which is
what an fx_bk module's backward leaves, adds ``N(0, (sigma * R)^2)`` once per logical step and
divides by the expected batch size). Only the module differs: ``fx_bk.transform`` instead of
Opacus's hooks and second backward.

Distributed (``torch.distributed`` initialized, the returned module wrapped in
``DistributedDataParallel`` by the user): DDP averages the clipped sums over the W ranks, each
rank's loader samples its share of the Poisson batch, and every rank draws the *same* noise
(one generator seed, broadcast once) with standard deviation ``sigma * R / W``, so that after
dividing by the per-rank expected batch size the update equals one process's on the whole batch
with the noise added once.
"""

from __future__ import annotations

import math
import warnings

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping

from ._torch_internals import mark_batch_dynamic, set_opacus_noise_per_rank
from .api import transform
from .criterion import checked_criterion
from .distributed import check_optimizer_params, noise_context
from .errors import ConfigError
from .runtime import BKModule


class PrivacyEngine:
    """``engine = fx_bk.PrivacyEngine(accountant="prv")``; then ``make_private`` or
    ``make_private_with_epsilon``; ``engine.get_epsilon(delta)`` at any time."""

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode

    def make_private(
        self,
        *,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        noise_multiplier: float,
        max_grad_norm,
        loss_reduction: str = "mean",
        compile: bool | dict = False,
        poisson_sampling: bool = True,
        clipping: str = "abadi",
        clipping_style="all-layer",
        noise_generator: torch.Generator | None = None,
        nonfinite: str = "skip",
        unbatched=(),
        criterion=None,
    ):
        """Return ``(module, optimizer, data_loader)``: the fx_bk-transformed module (compiled
        with ``torch.compile(fullgraph=True, **compile)`` when ``compile`` is true or a dict of
        options), the DP optimizer wrapping ``optimizer`` and the Poisson-sampling loader.
        With ``criterion`` (``nn.CrossEntropyLoss()``, a loss function), it returns
        ``(module, optimizer, criterion, data_loader)`` as Opacus's ghost clipping does; the
        criterion is ``fx_bk.checked_criterion(criterion, loss_reduction)``, proven at its first
        call to be the ``loss_reduction`` of per-sample losses.

        ``max_grad_norm``, ``clipping``, ``clipping_style``, ``nonfinite`` and ``unbatched`` are
        ``fx_bk.transform``'s; the noise standard deviation is ``noise_multiplier`` times the
        clipped gradient's bound (``sqrt(sum_k R_k^2)`` with clipping groups).
        """
        if isinstance(module, BKModule):
            raise ConfigError("make_private takes the plain model; it applies fx_bk.transform")
        if noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        world = _world_size()
        bk = transform(module, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                       clipping=clipping, clipping_style=clipping_style, nonfinite=nonfinite,
                       unbatched=unbatched)
        sample_rate = 1 / len(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate) / world
        if poisson_sampling:
            data_loader = DPDataLoader.from_data_loader(data_loader, distributed=world > 1)
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=bk.bk_config.sensitivity,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=_noise_generator(noise_generator, world, self.secure_mode, module),
            secure_mode=self.secure_mode,
        )
        if world > 1:  # every rank adds the same noise, 1/W of it: see the module docstring
            set_opacus_noise_per_rank(dp_optimizer, noise_multiplier / world)
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate))
        dp_optimizer.fx_bk_module = bk
        out_module = bk
        if compile:
            options = compile if isinstance(compile, dict) else {}
            out_module = torch.compile(bk, fullgraph=True, **options)
            data_loader = DynamicBatchLoader(data_loader)
        if criterion is not None:
            return out_module, dp_optimizer, checked_criterion(criterion, loss_reduction), \
                data_loader
        return out_module, dp_optimizer, data_loader

    def make_private_with_epsilon(
        self,
        *,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        data_loader: torch.utils.data.DataLoader,
        **kwargs,
    ):
        """``make_private`` with the noise multiplier that reaches ``target_epsilon`` at
        ``target_delta`` after ``epochs`` epochs (Opacus's search, this engine's accountant)."""
        if len(self.accountant) > 0:
            warnings.warn(
                "make_private_with_epsilon: privacy budget was already spent on this engine; "
                "the noise multiplier assumes none was, so the total epsilon will be higher",
                stacklevel=2,
            )
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=1 / len(data_loader),
            epochs=epochs,
            accountant=self.accountant.mechanism(),
        )
        return self.make_private(data_loader=data_loader, noise_multiplier=sigma, **kwargs)

    def get_epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` (``inf`` once a step ran without noise)."""
        if any(sigma == 0 for sigma, _, _ in getattr(self.accountant, "history", [])):
            return math.inf  # no noise, no privacy: PRV's own arithmetic overflows here
        return self.accountant.get_epsilon(delta)


class DPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for a clipped sum in ``p.grad``; a trainable parameter the forward
    never used (no gradient at all) gets the zero clipped sum, so it receives noise like every
    other coordinate instead of crashing Opacus's accumulation. With FSDP (sharded ``DTensor``
    parameters, ``fx_bk.distributed.fully_shard``) each rank adds the noise of its own shards;
    an optimizer left on parameters FSDP replaced is refused at the step."""

    fx_bk_module = None  # set by make_private: the module whose parameters this steps

    def pre_step(self, closure=None):
        if self.fx_bk_module is not None:
            check_optimizer_params(self, self.fx_bk_module)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return super().pre_step(closure)

    def accumulate(self):
        """Opacus's accumulation, with ``clone`` where Opacus deep-copies ``p.grad.data`` (which
        fails for a ``DTensor`` gradient: FSDP)."""
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad.detach().clone()
            else:
                p.summed_grad.add_(p.grad.detach())

    def add_noise(self):
        with noise_context(self.params):
            super().add_noise()


class DynamicBatchLoader:
    """Marks every batch's dim 0 as dynamic for torch.compile: Poisson batch sizes then share
    one compiled graph from the first step (sizes 0 and 1 are still specialized by Dynamo)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)

    def __iter__(self):
        for batch in self.loader:
            for t in _tensors(batch):
                if t.dim() > 0:
                    mark_batch_dynamic(t)
            yield batch


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _noise_generator(generator, world: int, secure_mode: bool, module: torch.nn.Module):
    if secure_mode or world == 1:
        return generator
    if generator is not None:
        raise ConfigError(
            "noise_generator with torch.distributed: every rank must draw the same noise; "
            "leave noise_generator unset and fx_bk seeds one generator on all ranks"
        )
    device = next(module.parameters()).device
    comm = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=comm)
    torch.distributed.broadcast(seed, src=0)  # one seed for all ranks: the noise is shared
    return torch.Generator(device=device).manual_seed(int(seed.item()))
