"""``fx_bk.PrivacyEngine``: Opacus's privacy engine, with fx_bk's one-backward clipping.

Shaped like ``opacus.PrivacyEngine`` so its users feel at home, and built from Opacus's own
parts: the accountant (RDP / PRV / GDP), ``DPDataLoader`` (Poisson sampling) and
``DPOptimizerFastGradientClipping`` (it expects ``p.grad`` to hold the clipped sum, which is
what an fx_bk module's backward leaves, adds ``N(0, (sigma * R)^2)`` once per logical step and
divides by the expected batch size). Only the module differs: ``fx_bk.transform`` instead of
Opacus's hooks and second backward.

Beyond Opacus: the privacy unit may be a user (``privacy_unit=fx_bk.UserLevel(...)``, NOTE
[user-level DP]), the bound may follow a quantile of the norms (``adaptive_clipping=``, NOTE
[adaptive clipping]), ``secure_mode=True`` draws noise and sampling from a secure source (NOTE
[secure mode]), and the normalizer may be a public constant (``expected_batch_size=``).

Distributed (``torch.distributed`` initialized, the returned module wrapped in
``DistributedDataParallel`` by the user): DDP averages the clipped sums over the W ranks, each
rank's loader samples its share of the Poisson batch, and every rank draws the *same* noise
(one generator seed broadcast once, or in secure mode rank 0's key per draw) with standard
deviation ``sigma * R / W``, so that after dividing by the per-rank expected batch size the
update equals one process's on the whole batch with the noise added once.
"""

from __future__ import annotations

import math
import warnings

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader

from ._torch_internals import mark_batch_dynamic
from .adaptive_clipping import AdaptiveClipping, AdaptiveClipState, gradient_noise_multiplier
from .api import transform
from .criterion import checked_criterion
from .dp_optimizer import DPOptimizer
from .errors import ConfigError
from .runtime import BKModule
from .sampling import EmptySafeCollator, PoissonBatchSampler
from .secure_random import SecureRandom, TorchRandom, broadcast_key
from .user_level import UserLevel, UserLevelModule, user_criterion, user_loader


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
        privacy_unit: UserLevel | None = None,
        adaptive_clipping: AdaptiveClipping | None = None,
        expected_batch_size: float | None = None,
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

        ``privacy_unit=fx_bk.UserLevel(user_ids, max_examples)``: user-level DP (NOTE [user-level
        DP]); the loader yields ``(examples, mask)`` with leaves ``[users, max_examples, ...]``
        and the criterion takes ``(output, target, mask)``. ``adaptive_clipping=
        fx_bk.AdaptiveClipping(...)``: R follows a quantile of the norms, ``max_grad_norm`` is
        its start (NOTE [adaptive clipping]). ``expected_batch_size``: the normalizer of the
        noised sum, a public constant (samples, or users, per step over all processes);
        default: the sampling rate times the dataset's size.
        """
        if isinstance(module, BKModule):
            raise ConfigError("make_private takes the plain model; it applies fx_bk.transform")
        if noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self._check_secure(noise_generator, poisson_sampling)
        world, rank = _world_size(), _rank()
        if privacy_unit is not None:
            module = UserLevelModule(module, privacy_unit.max_examples)
        bk = transform(module, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                       clipping=clipping, clipping_style=clipping_style, nonfinite=nonfinite,
                       unbatched=unbatched)
        if privacy_unit is None:  # Opacus's convention: q = 1 / len(loader), len(loader) steps
            units, steps = len(data_loader.dataset), len(data_loader)
            sample_rate = 1 / steps
        else:  # q = expected users per step / users; an epoch is about 1 / q steps
            units = privacy_unit.num_users
            sample_rate = min(1.0, data_loader.batch_size / units)
            steps = max(1, round(1 / sample_rate))
        if expected_batch_size is None:
            expected_batch_size = int(units * sample_rate)
        elif not expected_batch_size > 0:
            raise ConfigError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
        data_loader = self._loader(data_loader, privacy_unit, poisson_sampling, sample_rate,
                                   steps, rank, world)
        noise = self._noise_source(noise_generator, world, module)
        if adaptive_clipping is not None:
            adaptive = AdaptiveClipState(adaptive_clipping, expected_batch_size,
                                         len(bk.bk_config.group_bounds), noise,
                                         _all_reduce(_comm_device(module)) if world > 1 else None)
            gradient_noise_multiplier(noise_multiplier, adaptive.count_noise_std,
                                      adaptive.groups)  # a ConfigError now, not at the step
            bk.collect_per_sample_norms()
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=bk.bk_config.sensitivity,
            expected_batch_size=expected_batch_size / world,
            loss_reduction=loss_reduction,
            secure_mode=self.secure_mode,
            generator=getattr(noise, "generator", None),  # PyTorch's, as Opacus's attribute
            random=noise,
            world_size=world,  # every rank adds the same noise, 1/W of it: module docstring
        )
        if adaptive_clipping is not None:
            dp_optimizer.adaptive = adaptive
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate))
        dp_optimizer.fx_bk_module = bk
        out_module = bk
        if compile:
            options = compile if isinstance(compile, dict) else {}
            out_module = torch.compile(bk, fullgraph=True, **options)
            data_loader = DynamicBatchLoader(data_loader)
        if criterion is not None:
            checked = checked_criterion(criterion, loss_reduction) if privacy_unit is None \
                else user_criterion(criterion, loss_reduction)
            return out_module, dp_optimizer, checked, data_loader
        return out_module, dp_optimizer, data_loader

    def _check_secure(self, noise_generator, poisson_sampling: bool) -> None:
        if not self.secure_mode:
            return
        if noise_generator is not None:
            raise ConfigError(
                "secure_mode=True draws the noise from the operating system's entropy (NOTE "
                "[secure mode]); a noise_generator (a seed) would make it predictable. Leave "
                "noise_generator unset, or use secure_mode=False for reproducible runs")
        if not poisson_sampling:
            raise ConfigError(
                "secure_mode=True needs poisson_sampling=True: the sampling is then drawn from "
                "the secure source too (a shuffled loader uses PyTorch's generator)")

    def _loader(self, data_loader, unit, poisson_sampling: bool, sample_rate: float, steps: int,
                rank: int, world: int):
        """The sampling loader: Opacus's ``DPDataLoader``, or fx_bk's samplers for users or
        secure mode (``fx_bk/sampling.py``)."""
        random = SecureRandom() if self.secure_mode else TorchRandom(data_loader.generator)
        if unit is not None:
            return user_loader(data_loader, unit, sample_rate, random, steps, rank, world)
        if not poisson_sampling:
            return data_loader
        if not self.secure_mode:
            return DPDataLoader.from_data_loader(data_loader, distributed=world > 1)
        dataset = data_loader.dataset
        sampler = PoissonBatchSampler(len(dataset), sample_rate, random, steps,
                                      indices=range(rank, len(dataset), world))
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=data_loader.num_workers,
            collate_fn=EmptySafeCollator(data_loader.collate_fn, dataset[0]),
            pin_memory=data_loader.pin_memory)

    def _noise_source(self, generator, world: int, module: torch.nn.Module):
        """Where the noise comes from: the secure source (rank 0's key shared), or PyTorch's
        generator (one seed broadcast under torch.distributed: the same noise on all ranks)."""
        if self.secure_mode:
            share = broadcast_key(_comm_device(module)) if world > 1 else None
            return SecureRandom(share)
        return TorchRandom(_noise_generator(generator, world, module))

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


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce(device: torch.device):
    """Sums a tensor over all ranks, through ``device`` (adaptive clipping's counts)."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.to(device, copy=True)
        torch.distributed.all_reduce(out)
        return out.to(t.device)

    return reduce


def _comm_device(module: torch.nn.Module) -> torch.device:
    device = next(module.parameters()).device
    return device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def _noise_generator(generator, world: int, module: torch.nn.Module):
    if world == 1:
        return generator
    if generator is not None:
        raise ConfigError(
            "noise_generator with torch.distributed: every rank must draw the same noise; "
            "leave noise_generator unset and fx_bk seeds one generator on all ranks"
        )
    device = next(module.parameters()).device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=_comm_device(module))
    torch.distributed.broadcast(seed, src=0)  # one seed for all ranks: the noise is shared
    return torch.Generator(device=device).manual_seed(int(seed.item()))
