"""``DPOptimizer``: Opacus's optimizer for a clipped sum in ``p.grad``, with fx_bk's noise.

Opacus's ``DPOptimizerFastGradientClipping`` expects ``p.grad`` to hold the clipped sum (what
an fx_bk module's backward leaves); its step accumulates micro-batches, adds the noise once per
logical step, divides by the expected batch size and calls the accountant's hook, which
accounts with ``noise_multiplier``. This subclass changes only where the noise comes from and
how large it is, and what happens after a step:

* the noise is drawn from ``random`` (``fx_bk/secure_random.py``: PyTorch's generator exactly
  as Opacus draws it, or the secure source of ``secure_mode``) with standard deviation
  ``gradient_noise_multiplier * max_grad_norm``. That multiplier is computed at each step from
  ``noise_multiplier`` (what the accountant records; a noise scheduler may change it): equal to
  it, divided by W on each of W ranks under ``torch.distributed`` (all drawing the same noise:
  ``fx_bk/privacy_engine.py``), and larger with adaptive clipping (the noisy count's share of
  the budget, NOTE [adaptive clipping]);
* with adaptive clipping, after each step the bounds of the fx_bk module (and the noise's
  ``max_grad_norm``) are updated from the per-sample norms of that step's backward passes;
* a trainable parameter the forward never used gets the zero clipped sum, so it receives noise
  like every other coordinate; with FSDP each rank adds the noise of its own shards; an
  optimizer left on parameters FSDP replaced is refused at the step.
"""

from __future__ import annotations

import math

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from .adaptive_clipping import gradient_noise_multiplier
from .distributed import check_optimizer_params, noise_context
from .secure_random import SecureRandom, TorchRandom


class DPOptimizer(DPOptimizerFastGradientClipping):
    fx_bk_module = None  # set by make_private: the module whose parameters this steps
    adaptive = None  # an fx_bk.adaptive_clipping.AdaptiveClipState, with adaptive clipping
    unclipped_fraction = None  # adaptive clipping: the last step's noisy fractions [K]

    def __init__(self, optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 random=None, world_size: int = 1, **kwargs):
        super().__init__(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=max_grad_norm, **kwargs)
        if random is None:
            random = SecureRandom() if self.secure_mode else TorchRandom(self.generator)
        self.random = random
        self.world_size = world_size

    @property
    def gradient_noise_multiplier(self) -> float:
        """The noise's standard deviation over ``max_grad_norm``, from ``noise_multiplier`` now
        (see the module docstring)."""
        sigma = self.noise_multiplier
        if self.adaptive is not None:
            sigma = gradient_noise_multiplier(sigma, self.adaptive.count_noise_std,
                                              self.adaptive.groups)
        return sigma / self.world_size

    def pre_step(self, closure=None):
        if self.fx_bk_module is not None:
            check_optimizer_params(self, self.fx_bk_module)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stepped = super().pre_step(closure)
        if stepped and self.adaptive is not None:
            self._adapt_bounds()
        return stepped

    def zero_grad(self, set_to_none: bool = False):
        """Opacus's (the clipped sums are dropped unless the last step was skipped, as in
        gradient accumulation); with adaptive clipping the recorded norms go with them, so the
        count covers exactly the samples whose clipped gradients the next step adds."""
        if self.adaptive is not None and not self._is_last_step_skipped \
                and self.fx_bk_module is not None:
            self.fx_bk_module.take_per_sample_norms()
        super().zero_grad(set_to_none)

    def _adapt_bounds(self) -> None:
        module = self.fx_bk_module
        bounds, self.unclipped_fraction = self.adaptive.next_bounds(
            module.take_per_sample_norms(), module.current_clip_bounds)
        module.set_clip_bounds(bounds)
        self.max_grad_norm = math.sqrt(sum(r * r for r in module.current_clip_bounds))

    def accumulate(self):
        """Opacus's accumulation, with ``clone`` where Opacus deep-copies ``p.grad.data`` (which
        fails for a ``DTensor`` gradient: FSDP)."""
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad.detach().clone()
            else:
                p.summed_grad.add_(p.grad.detach())

    def add_noise(self):
        std = self.gradient_noise_multiplier * self.max_grad_norm
        with noise_context(self.params):
            for p in self.params:
                if getattr(p.summed_grad, "_processed", False):
                    raise ValueError(
                        "fx_bk DPOptimizer: this clipped sum was already noised and used in a "
                        "step; call optimizer.zero_grad() after each step (a reused sum would "
                        "count its samples twice)")
                p.grad = (p.summed_grad + self.random.normal(std, p.summed_grad)).view_as(p)
                p.summed_grad._processed = True
