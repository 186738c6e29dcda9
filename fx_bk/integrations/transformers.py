"""DP-SGD with a Hugging Face ``transformers.Trainer``: ``DPTrainer`` (docs/trainer.md).

    DPTrainer(*trainer_args, max_grad_norm, noise_multiplier=None, target_epsilon=None,
              target_delta=1e-5, accountant="prv", per_sample_loss=None, compile=None,
              dp_seed=None, clipping="abadi", clipping_style="all-layer", unbatched=(),
              **trainer_kwargs)

    args = TrainingArguments("out", per_device_train_batch_size=16, gradient_accumulation_steps=4,
                             num_train_epochs=3, learning_rate=1e-3, max_grad_norm=0.0)
    trainer = DPTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                        max_grad_norm=1.0, target_epsilon=8.0, target_delta=1e-5)
    trainer.train()                # every log has "epsilon"; checkpoints resume exactly
    print(trainer.get_epsilon())   # epsilon spent so far at target_delta

A ``Trainer`` in everything but the training step:

* the model runs through ``fx_bk.transform`` (optionally ``torch.compile``); only trainable
  parameters (PEFT adapters) are clipped (bound ``max_grad_norm``), noised and updated;
* Poisson sampling replaces the Trainer's sampler: rate ``q = L / N`` with the expected logical
  batch ``L = per_device_train_batch_size * gradient_accumulation_steps``, ``floor(N / L)``
  logical batches an epoch, each split into ``gradient_accumulation_steps`` micro-batches of
  varying size (0 included);
* the loss is a sum of per-sample losses computed from the logits and labels (the model never
  gets ``labels``): ``fx_bk.sequence_cross_entropy(logits, labels, shift=True)`` for a causal
  LM, cross entropy or squared error otherwise, or ``per_sample_loss(outputs, labels) -> [B]``,
  proven per-sample by ``fx_bk.checked_criterion``;
* the Trainer's optimizer is wrapped in Opacus's ``DPOptimizerFastGradientClipping``: noise
  ``N(0, (noise_multiplier * max_grad_norm)^2)`` once per logical batch, then division by
  ``L``; ``target_epsilon`` gives ``noise_multiplier`` (Opacus's ``get_noise_multiplier``);
* an Opacus accountant steps once per logical batch; ``epsilon`` joins every log; checkpoints
  add ``dp_state.pt`` (accountant, sampler seed, noise generator), which
  ``train(resume_from_checkpoint=...)`` restores: same epsilon, same parameters.

Settings that would break DP-SGD or its accounting raise ``fx_bk.ConfigError``. Not private:
the logged loss, checkpoints (``dp_state.pt`` lets one recompute the noise), ``dp_seed``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import warnings
from collections.abc import Callable

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .._torch_internals import mark_batch_dynamic
from ..api import transform
from ..criterion import checked_criterion
from ..errors import ConfigError
from ..privacy_engine import DPOptimizer
from . import (
    NOISE_STREAM,
    EmptySafeCollator,
    PoissonBatchSampler,
    check_noise_settings,
    default_per_sample_loss,
    derive_seed,
)

__all__ = ["DP_STATE_NAME", "DPTrainer", "PoissonBatchSampler", "default_per_sample_loss"]

DP_STATE_NAME = "dp_state.pt"


class _TrainerDPOptimizer(DPOptimizer):
    """fx_bk's Opacus optimizer, for the Trainer: it zeroes gradients through the model, never
    through this optimizer, so the clipped sum Opacus keeps (``p.summed_grad``) is dropped
    after each step here."""

    def step(self, closure=None):
        try:
            return super().step(closure)
        finally:
            for p in self.params:
                p.summed_grad = None


class DPTrainer(Trainer):
    """A ``Trainer`` that trains with DP-SGD. ``max_grad_norm``: the per-sample bound R; one of
    ``noise_multiplier`` and ``target_epsilon``; ``target_delta``: the delta of the epsilon;
    ``accountant``: "prv", "rdp" or "gdp"; ``compile``: ``torch.compile`` the fx_bk module
    (``None``: ``args.torch_compile``); ``dp_seed``: seeds sampler and noise (secret; default
    random); ``clipping``, ``clipping_style``, ``unbatched``: ``fx_bk.transform``'s."""

    def __init__(self, *args, max_grad_norm, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float = 1e-5,
                 accountant: str = "prv", per_sample_loss: Callable | None = None,
                 compile: bool | dict | None = None, dp_seed: int | None = None,
                 clipping: str = "abadi", clipping_style="all-layer", unbatched=(), **kwargs):
        names = ("model", "args", "data_collator", "train_dataset")
        given = {**dict(zip(names, args)), **kwargs}
        _check_trainer_settings(type(self), given)
        check_noise_settings(noise_multiplier, target_epsilon, target_delta)
        super().__init__(*args, **kwargs)
        self._init_sampling(dp_seed)
        self._init_noise(noise_multiplier, target_epsilon, target_delta, accountant)
        self.dp_module = transform(self.model, max_grad_norm=max_grad_norm,
                                   loss_reduction="sum", clipping=clipping,
                                   clipping_style=clipping_style, unbatched=unbatched)
        compile = self.args.torch_compile if compile is None else compile
        self._compiled = bool(compile)
        self._forward = torch.compile(
            self.dp_module, fullgraph=True, **(compile if isinstance(compile, dict) else {})
        ) if compile else self.dp_module
        per_sample_loss = per_sample_loss or self._default_loss()
        self._criterion = checked_criterion(
            lambda outputs, labels: per_sample_loss(outputs, labels).sum(), "sum")
        device = next(p for p in self.model.parameters() if p.requires_grad).device
        self.noise_generator = torch.Generator(device=device)
        self.noise_generator.manual_seed(derive_seed(self.poisson_sampler.seed, NOISE_STREAM))
        self._fresh_runs = 0
        self._epsilon_cache: tuple = (None, None)

    def _init_sampling(self, dp_seed: int | None) -> None:
        """Expected batch size L, sampling rate q = L / N, the Poisson sampler."""
        n = len(self.train_dataset)
        self.expected_batch_size = self._train_batch_size * self.args.gradient_accumulation_steps
        if self.expected_batch_size > n:
            raise ConfigError(
                f"DPTrainer: expected batch size per_device_train_batch_size * "
                f"gradient_accumulation_steps = {self.expected_batch_size} exceeds the "
                f"{n} training examples (the sampling rate would be above 1)"
            )
        self.sample_rate = self.expected_batch_size / n
        self.steps_per_epoch = n // self.expected_batch_size
        seed = secrets.randbits(63) if dp_seed is None else int(dp_seed)
        self.poisson_sampler = PoissonBatchSampler(
            n, self.sample_rate, self.steps_per_epoch, self.args.gradient_accumulation_steps,
            seed, first_step=self._epoch_first_step)

    def _init_noise(self, noise_multiplier, target_epsilon, target_delta, accountant) -> None:
        """The accountant, and sigma (from ``target_epsilon`` over the planned steps)."""
        n = len(self.train_dataset)
        if target_delta >= 1 / n:
            warnings.warn(f"DPTrainer: target_delta={target_delta} is not below 1/N = {1 / n:.3g};"
                          f" such a delta permits releasing an example outright", stacklevel=3)
        self.target_delta = target_delta
        self.accountant = create_accountant(mechanism=accountant)
        if target_epsilon is not None:
            noise_multiplier = get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta,
                sample_rate=self.sample_rate, steps=self._total_steps(), accountant=accountant)
        self.noise_multiplier = float(noise_multiplier)
        if self.noise_multiplier == 0:
            warnings.warn("DPTrainer: noise_multiplier=0 gives no privacy (epsilon is infinite)",
                          stacklevel=3)

    # ---- privacy -------------------------------------------------------------------------

    @property
    def privacy_steps(self) -> int:
        """Logical batches accounted so far (noised optimizer steps)."""
        return sum(int(h[2]) for h in self.accountant.history)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default ``target_delta``); 0 before any step."""
        delta = self.target_delta if delta is None else delta
        key = (self.privacy_steps, delta, len(self.accountant.history))
        if key[0] == 0:
            return 0.0
        if any(h[0] == 0 for h in self.accountant.history):
            return math.inf  # a step without noise
        if self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, float(self.accountant.get_epsilon(delta=delta)))
        return self._epsilon_cache[1]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.privacy_steps > 0:
            logs.setdefault("epsilon", self.get_epsilon())
        super().log(logs, *args, **kwargs)

    def _total_steps(self) -> int:
        args = self.args
        return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs
                                                                     * self.steps_per_epoch)

    def _epoch_first_step(self) -> int:
        """The run's logical index of the first batch of the epoch now starting: the Trainer
        starts epoch ``global_step // steps_per_epoch`` (also when resuming mid-epoch)."""
        return self.state.global_step // self.steps_per_epoch * self.steps_per_epoch

    # ---- data --------------------------------------------------------------------------

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The training set under Poisson sampling (``poisson_sampler``), not the Trainer's."""
        dataset, collate = self.train_dataset, self.data_collator
        if type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        extra = {}
        if self.args.dataloader_num_workers > 0:
            extra = {"persistent_workers": self.args.dataloader_persistent_workers,
                     "prefetch_factor": self.args.dataloader_prefetch_factor}
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=self.poisson_sampler,
            collate_fn=EmptySafeCollator(collate, dataset[0]),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory, **extra,
        )

    # ---- the step ------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, wrapped: noise once per logical batch, / expected size."""
        super().create_optimizer(model)
        if self.dp_optimizer is None:  # a second train() finds it inside accelerate's wrapper
            self.optimizer = _TrainerDPOptimizer(
                self.optimizer, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.dp_module.bk_config.sensitivity,
                expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                generator=self.noise_generator)
            self.optimizer.attach_step_hook(
                self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return self.optimizer

    @property
    def dp_optimizer(self) -> DPOptimizer | None:
        """The DP optimizer (``self.optimizer`` may be accelerate's wrapper around it)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, _TrainerDPOptimizer):
            opt = getattr(opt, "optimizer", None)
        return opt

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: fx_bk forward, per-sample losses summed, backward (``p.grad`` +=
        clipped sum). Returns the summed loss / expected batch size, for the logged loss."""
        self.model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = dict(self._prepare_inputs(inputs))
        labels = inputs.pop(self._label_name(inputs))
        if labels.shape[0] == 0:
            # no sample: the clipped sum is 0 (the optimizer gives missing grads zeros and adds
            # the noise). Many HF models cannot even run a 0-row forward (view(B, T, -1, d)).
            return torch.zeros((), device=self.args.device)
        if self._compiled:
            for t in inputs.values():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    mark_batch_dynamic(t)
        with self.compute_loss_context_manager():
            outputs = self._forward(**inputs)
        loss = self._criterion(outputs, labels)
        self.accelerator.backward(loss)
        return loss.detach() / self.expected_batch_size

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # not logged: before the step, the gradient is the clipped sum, no noise

    def _label_name(self, inputs) -> str:
        names = list(self.args.label_names or self.label_names or ["labels"])
        if len(names) != 1 or names[0] not in inputs:
            raise ConfigError(
                f"DPTrainer computes one loss per sample from the batch's labels, so it needs "
                f"exactly one label field; label_names={names}, batch keys {sorted(inputs)} "
                f"(set TrainingArguments(label_names=[...]); a model computing its own loss "
                f"without labels is not supported)"
            )
        return names[0]

    def _default_loss(self):
        model = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        shift = getattr(self, "_loss_shifts_labels", None)
        if shift is None:
            shift = getattr(base, "loss_type", None) == "ForCausalLM"
        config = getattr(base, "config", None)
        return default_per_sample_loss(shift_labels=bool(shift),
                                       problem_type=getattr(config, "problem_type", None))

    # ---- checkpoints ---------------------------------------------------------------------

    def dp_state_dict(self) -> dict:
        """What a checkpoint needs to resume DP training exactly (secret: see the docstring)."""
        return {
            "format": 1,
            "accountant": self.accountant.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "sampler": {"seed": self.poisson_sampler.seed, "run": self.poisson_sampler.run},
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": float(self.dp_module.bk_config.sensitivity),
            "expected_batch_size": self.expected_batch_size,
        }

    def load_dp_state_dict(self, state: dict) -> None:
        for key, ours in self.dp_state_dict().items():
            if isinstance(ours, float) and not math.isclose(state[key], ours, rel_tol=1e-9):
                warnings.warn(f"DPTrainer: resuming with {key}={ours}, the checkpoint used "
                              f"{state[key]}; the accountant records both", stacklevel=3)
        self.accountant.load_state_dict(state["accountant"])
        self.noise_generator.set_state(state["noise_generator"])
        self.poisson_sampler.seed = int(state["sampler"]["seed"])
        self.poisson_sampler.run = int(state["sampler"]["run"])
        self._epsilon_cache = (None, None)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        output_dir = os.path.join(self._get_output_dir(trial=trial), folder)
        if self.args.should_save and os.path.isdir(output_dir):
            torch.save(self.dp_state_dict(), os.path.join(output_dir, DP_STATE_NAME))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; resuming also restores ``dp_state.pt`` (accountant, sampler,
        noise generator). A fresh ``train()`` after another samples new batches."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in {self.args.output_dir}")
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, DP_STATE_NAME)
            if not os.path.isfile(path):
                raise ConfigError(
                    f"DPTrainer: {resume_from_checkpoint} has no {DP_STATE_NAME} (not saved by "
                    f"DPTrainer, or with save_only_model=True): resuming without the accountant "
                    f"history would under-report epsilon"
                )
            self.load_dp_state_dict(torch.load(path, weights_only=True))
        else:
            self.poisson_sampler.run = self._fresh_runs
            if self.privacy_steps > 0:
                warnings.warn("DPTrainer: train() again; the accountant keeps the earlier steps, "
                              "so epsilon grows past any target_epsilon", stacklevel=2)
        self._fresh_runs = max(self._fresh_runs, self.poisson_sampler.run) + 1
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _value(option) -> str:
    """An enum option of TrainingArguments, or its string, as a string."""
    return str(getattr(option, "value", option))


def _check_trainer_settings(cls, given: dict) -> None:
    """Refuse the Trainer settings that would break DP-SGD or its accounting."""
    args = given.get("args")
    if args is None:
        raise ConfigError("DPTrainer needs TrainingArguments (args=...)")
    default_clip = next(f.default for f in dataclasses.fields(TrainingArguments)
                        if f.name == "max_grad_norm")
    if args.max_grad_norm and args.max_grad_norm > 0:
        if args.max_grad_norm != default_clip:
            raise ConfigError(
                f"DPTrainer: TrainingArguments(max_grad_norm={args.max_grad_norm}) would clip "
                f"the noised mean gradient, which DP-SGD does not do; the per-sample bound is "
                f"DPTrainer(max_grad_norm=...). Set TrainingArguments(max_grad_norm=0.0)"
            )
        warnings.warn("DPTrainer: TrainingArguments.max_grad_norm (the Trainer's clipping of the "
                      "noised gradient) is turned off; DPTrainer(max_grad_norm=...) is the "
                      "per-sample bound", stacklevel=3)
        args.max_grad_norm = 0.0
    refused = {
        "dataloader_drop_last": "Poisson batches have no last batch to drop",
        "fp16": "a GradScaler scales the clipped sums and skips accounted steps (use bf16)",
        "auto_find_batch_size": "it would change the sampling rate mid-run",
        "deepspeed": "DeepSpeed is not supported",
        "fsdp": "FSDP is not supported",
        "label_smoothing_factor": "the label smoother computes a batch loss (not per sample)",
    }
    for name, why in refused.items():
        if getattr(args, name, None):
            raise ConfigError(f"DPTrainer: TrainingArguments({name}={getattr(args, name)!r}) "
                              f"is not supported: {why}")
    if args.push_to_hub and _value(args.hub_strategy) in ("checkpoint", "all_checkpoints"):
        raise ConfigError(
            f"DPTrainer: push_to_hub with hub_strategy={_value(args.hub_strategy)!r} would "
            f"publish checkpoints, whose {DP_STATE_NAME} holds the noise generator state (the "
            f"noise can be recomputed from it); push the final model only")
    if _value(args.train_sampling_strategy) != "random":
        raise ConfigError(
            f"DPTrainer: train_sampling_strategy={args.train_sampling_strategy!r} is not "
            f"supported: DP-SGD's accounting needs Poisson sampling, which DPTrainer does itself")
    if args.world_size > 1 or args.n_gpu > 1:
        raise ConfigError(f"DPTrainer runs in one process on one device (world_size="
                          f"{args.world_size}, n_gpu={args.n_gpu})")
    for name in ("compute_loss_func", "model_init"):
        if given.get(name) is not None:
            why = ("use per_sample_loss=fn(outputs, labels) -> [B]" if name == "compute_loss_func"
                   else "pass the model itself")
            raise ConfigError(f"DPTrainer: {name} is not supported: {why}")
    for method in ("get_train_dataloader", "_get_train_sampler"):
        if getattr(cls, method) is not getattr(DPTrainer, method):
            raise ConfigError(
                f"DPTrainer: {cls.__name__} overrides {method}; the training batches must come "
                f"from DPTrainer's Poisson sampler, which the accounting assumes")
    dataset = given.get("train_dataset")
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) \
            or not hasattr(dataset, "__len__"):
        raise ConfigError("DPTrainer needs a train_dataset with __len__ and indexing (Poisson "
                          f"sampling draws from all N examples), got {type(dataset).__name__}")
