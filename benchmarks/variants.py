"""Training-step builders: non-private, Opacus (hooks, ghost clipping) and fx_bk.

Each builder takes the model to train (its own copy), an optimizer factory (``params ->
torch.optim.Optimizer``) and the loss, and returns a ``Variant`` whose ``step_fn(x, y,
keep_grads=False, keep_outputs=False) -> StepOut`` runs forward + loss + backward + optimizer
step and sets the gradients to None. ``keep_grads``: return the step's gradients before the
optimizer step (for the private variants the clipped sum ``sum_i C_i grad_i``, noise aside);
``keep_outputs``: return the detached loss and model output (a tensor). Otherwise the model
output is dropped before the backward pass, as in ``loss_fn(model(x), y).backward()``: what the
memory measurement sees is the step itself.

``autocast`` (``plain``, ``fx_bk_variant``): the forward runs under ``torch.autocast(device,
dtype)``, the loss (in float32: the benchmark's loss casts the logits) and the backward outside
it, as AMP does.

``benchmarks.step`` builds them through ``build_variant`` (SGD, the benchmark model's loss, no
noise; ``AUTOCAST_VARIANTS``: the two compiled ones under bf16 autocast);
``python -m fx_bk.demo --compare`` calls ``plain`` and ``opacus_ghost`` with Adam, a
noise multiplier, a seeded noise generator and an Opacus accountant.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import fx_bk
from fx_bk._torch_internals import mark_batch_dynamic

BASELINE = "non-private compiled"
PRIVATE = "fx_bk compiled"
VARIANTS = ("non-private eager", "non-private compiled", "Opacus hooks", "Opacus ghost",
            "fx_bk eager", "fx_bk compiled")
# with ``--autocast bf16``: the forward under torch.autocast(device, dtype=torch.bfloat16)
AUTOCAST_VARIANTS = ("non-private compiled bf16", "fx_bk compiled bf16")
Autocast = tuple[str, torch.dtype]  # (device type, dtype) of torch.autocast

OptimizerFactory = Callable[[list], torch.optim.Optimizer]
LossFn = Callable[[object, torch.Tensor], torch.Tensor]  # (model output, y) -> scalar loss


class StepOut(NamedTuple):
    grads: dict[str, torch.Tensor] | None = None  # keep_grads: the gradients the step applied
    loss: torch.Tensor | None = None  # keep_outputs: the detached loss ...
    out: torch.Tensor | None = None  # ... and model output


class Variant:
    """One way of running a training step on its own copy of the model."""

    def __init__(self, name: str, step_fn=None, bk=None, error: str | None = None,
                 model: nn.Module | None = None, opt=None):
        self.name = name
        self.step_fn = step_fn  # (x, y, keep_grads=False, keep_outputs=False) -> StepOut
        self.bk = bk  # the fx_bk module, for its traced program
        self.model = model  # the module whose parameters are trained (not the wrapper)
        self.opt = opt  # its optimizer (Opacus: the DPOptimizer)
        self.times: list[float] = []
        self.steps = 0  # timed steps per round
        self.round_ms: list[float] = []  # median step of each round
        self.first_step_s: float | None = None
        self.grad_check: float | None = None
        self.error = error


def _grads(model: nn.Module, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() * scale for n, p in model.named_parameters()
            if p.grad is not None}


def _detached(keep: bool, t):
    return t.detach() if keep else None


def _forward_loss(fwd, loss_fn: LossFn, x, y, keep_outputs: bool):
    """``(loss_fn(fwd(x), y), detached output or None)``; the output itself is dropped here."""
    out = fwd(x)
    return loss_fn(out, y), _detached(keep_outputs, out)


def _autocast_forward(fwd, autocast: Autocast | None):
    """``fwd``, run under ``torch.autocast(*autocast)`` when given (the caller's loss and
    backward stay outside it)."""
    if autocast is None:
        return fwd
    device_type, dtype = autocast

    def forward(x):
        with torch.autocast(device_type, dtype=dtype):
            return fwd(x)

    return forward


def _loss_step(name: str, model: nn.Module, fwd, opt, loss_fn: LossFn, dynamic_batch: bool,
               autocast: Autocast | None = None, **variant) -> Variant:
    """Variant whose step is ``loss_fn(fwd(x), y).backward()``, then ``opt.step()``."""
    fwd = _autocast_forward(fwd, autocast)

    def step(x, y, keep_grads=False, keep_outputs=False):
        if dynamic_batch:
            mark_batch_dynamic(x)
        loss, out = _forward_loss(fwd, loss_fn, x, y, keep_outputs)
        kept_loss = _detached(keep_outputs, loss)
        loss.backward()
        del loss
        grads = _grads(model) if keep_grads else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return StepOut(grads, kept_loss, out)

    return Variant(name, step, model=model, opt=opt, **variant)


def plain(model: nn.Module, *, optimizer: OptimizerFactory, loss_fn: LossFn,
          compiled: bool = False, dynamic_batch: bool = False, autocast: Autocast | None = None,
          name: str = "non-private") -> Variant:
    """Non-private training: ``model`` (``torch.compile(fullgraph=True)`` when ``compiled``;
    ``dynamic_batch``: every batch marked dynamic, for Poisson batch sizes; ``autocast``:
    ``(device_type, dtype)`` of the forward's ``torch.autocast``)."""
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    opt = optimizer(model.parameters())
    return _loss_step(name, model, fwd, opt, loss_fn, dynamic_batch and compiled, autocast)


def fx_bk_variant(model: nn.Module, *, optimizer: OptimizerFactory, loss_fn: LossFn,
                  max_grad_norm: float, compiled: bool = False, autocast: Autocast | None = None,
                  name: str = "fx_bk") -> Variant:
    """``fx_bk.transform(model, max_grad_norm)``: one backward leaves ``sum_i C_i grad_i`` in
    ``p.grad``; no noise (the caller's optimizer scales by 1 / B, as DP-SGD averages).
    ``autocast``: as in ``plain``."""
    bk = fx_bk.transform(model, max_grad_norm=max_grad_norm)
    fwd = torch.compile(bk, fullgraph=True) if compiled else bk
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    return _loss_step(name, model, fwd, opt, loss_fn, False, autocast, bk=bk)


def _dp_optimizer(cls, opt, *, max_grad_norm, expected_batch_size, noise_multiplier, generator,
                  accountant, sample_rate):
    """Opacus's DP optimizer around ``opt``, as ``opacus.PrivacyEngine.make_private`` builds it;
    with ``accountant``, the accountant's hook records every step at ``sample_rate``."""
    dp_opt = cls(opt, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                 expected_batch_size=expected_batch_size, loss_reduction="mean",
                 generator=generator)
    if accountant is not None:
        dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return dp_opt


def opacus_hooks(model: nn.Module, *, optimizer: OptimizerFactory, loss_fn: LossFn,
                 max_grad_norm: float, expected_batch_size: int, noise_multiplier: float = 0.0,
                 generator: torch.Generator | None = None, accountant=None,
                 sample_rate: float | None = None, name: str = "Opacus hooks") -> Variant:
    """``GradSampleModule(grad_sample_mode="hooks")`` + ``DPOptimizer``: per-sample gradients,
    clip, sum, noise, divide by ``expected_batch_size``. ``keep_grads``: ``p.grad`` times
    ``expected_batch_size`` (the clipped sum where there is no noise)."""
    from opacus.grad_sample.utils import get_gsm_class
    from opacus.optimizers import DPOptimizer

    gsm = get_gsm_class("hooks")(model, batch_first=True, loss_reduction="mean")
    opt = _dp_optimizer(DPOptimizer, optimizer(gsm.parameters()), max_grad_norm=max_grad_norm,
                        expected_batch_size=expected_batch_size,
                        noise_multiplier=noise_multiplier, generator=generator,
                        accountant=accountant, sample_rate=sample_rate)

    def step(x, y, keep_grads=False, keep_outputs=False):
        loss, out = _forward_loss(gsm, loss_fn, x, y, keep_outputs)
        kept_loss = _detached(keep_outputs, loss)
        loss.backward()  # p.grad_sample: [B, *p.shape]
        del loss
        grads = None
        if keep_grads:  # clip, sum, noise, / B; report B p.grad
            if opt.pre_step():
                grads = _grads(model, scale=expected_batch_size)
                opt.original_optimizer.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return StepOut(grads, kept_loss, out)

    return Variant(name, step, model=model, opt=opt)


def opacus_ghost(model: nn.Module, *, optimizer: OptimizerFactory, max_grad_norm: float,
                 expected_batch_size: int, logits_targets=None, criterion: nn.Module | None = None,
                 noise_multiplier: float = 0.0, generator: torch.Generator | None = None,
                 accountant=None, sample_rate: float | None = None,
                 name: str = "Opacus ghost") -> Variant:
    """Ghost clipping, what ``opacus.PrivacyEngine().make_private(grad_sample_mode="ghost")``
    builds: ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``,
    ``DPOptimizerFastGradientClipping`` and ``DPLossFastGradientClipping`` around ``criterion``
    (default cross entropy), whose ``backward`` runs two backward passes (norms, then the
    clipped loss). ``logits_targets(out, y) -> (logits, targets, shape)`` flattens the output for
    the criterion (default: ``(out, y, None)``)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm,
        use_ghost_clipping=True,
    )
    opt = _dp_optimizer(DPOptimizerFastGradientClipping, optimizer(gsm.parameters()),
                        max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                        noise_multiplier=noise_multiplier, generator=generator,
                        accountant=accountant, sample_rate=sample_rate)
    criterion = DPLossFastGradientClipping(
        gsm, opt, nn.CrossEntropyLoss(reduction="mean") if criterion is None else criterion,
        "mean")
    split = logits_targets or (lambda out, y: (out, y, None))

    def step(x, y, keep_grads=False, keep_outputs=False):
        out = gsm(x)
        kept_out = _detached(keep_outputs, out)
        logits, targets, shape = split(out, y)  # kept until the step returns
        del out
        loss = criterion(logits, targets, shape=shape)
        kept_loss = _detached(keep_outputs, loss)
        loss.backward()  # two passes; p.grad = clipped sum
        del loss
        grads = _grads(model) if keep_grads else None
        opt.step()  # noise, divide by expected_batch_size, the wrapped optimizer's step
        opt.zero_grad(set_to_none=True)
        return StepOut(grads, kept_loss, kept_out)

    return Variant(name, step, model=model, opt=opt)


def build_variant(name: str, bm, base: nn.Module, args) -> Variant:
    """The benchmark's variant ``name`` (one of ``VARIANTS`` or ``AUTOCAST_VARIANTS``) on a copy
    of ``base``: SGD at ``args.lr``, the batch mean of ``bm.per_sample_loss``, clipping at
    ``args.max_grad_norm``, no noise. A builder that raises gives a ``Variant`` with ``error``
    set."""
    model = copy.deepcopy(base)
    B, R = bm.batch_size, args.max_grad_norm
    amp = (torch.device(args.device).type, torch.bfloat16)  # the "... bf16" variants

    def sgd(lr):
        return lambda params: torch.optim.SGD(params, lr=lr)

    def loss(out, y):
        return bm.per_sample_loss(out, y).mean()

    # DP-SGD averages the clipped sum over the expected batch size (a constant, as in Opacus's
    # DPOptimizer); for fx_bk with SGD that is a learning-rate scale, not a pass over the grads
    builders = {
        "non-private eager": lambda: plain(model, optimizer=sgd(args.lr), loss_fn=loss),
        "non-private compiled": lambda: plain(model, optimizer=sgd(args.lr), loss_fn=loss,
                                              compiled=True),
        "Opacus hooks": lambda: opacus_hooks(model, optimizer=sgd(args.lr), loss_fn=loss,
                                             max_grad_norm=R, expected_batch_size=B),
        "Opacus ghost": lambda: opacus_ghost(model, optimizer=sgd(args.lr), max_grad_norm=R,
                                             expected_batch_size=B,
                                             logits_targets=bm.logits_targets),
        "fx_bk eager": lambda: fx_bk_variant(model, optimizer=sgd(args.lr / B), loss_fn=loss,
                                             max_grad_norm=R),
        "fx_bk compiled": lambda: fx_bk_variant(model, optimizer=sgd(args.lr / B), loss_fn=loss,
                                                max_grad_norm=R, compiled=True),
        "non-private compiled bf16": lambda: plain(model, optimizer=sgd(args.lr), loss_fn=loss,
                                                   compiled=True, autocast=amp),
        "fx_bk compiled bf16": lambda: fx_bk_variant(model, optimizer=sgd(args.lr / B),
                                                     loss_fn=loss, max_grad_norm=R,
                                                     compiled=True, autocast=amp),
    }
    try:
        v = builders[name]()
    except Exception as e:  # noqa: BLE001 - a rejected variant is reported as n/a
        v = Variant(name, error=reason(e))
    v.name = name
    return v


def reason(e: BaseException) -> str:
    """One line (at most 160 characters) naming an exception, for the report."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def ieee_float32(device: str) -> None:
    """IEEE float32 GEMMs and convolutions for every variant: fx_bk refuses TF32
    (``fx_bk/precision_guard.py``), which PyTorch enables for cuDNN convolutions by default."""
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compiled_pair(bm) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, Variant]]:
    """The profiling tools' setup: ``bm``'s weights (built after ``torch.manual_seed(0)``), its
    batch 0, and the ``BASELINE`` and ``PRIVATE`` variants built from them (CPU, learning rate
    1e-3, clipping at 1)."""
    torch.manual_seed(0)
    base = bm.build()
    x, y = bm.batch(0)
    ns = types.SimpleNamespace(lr=1e-3, max_grad_norm=1.0, device="cpu")
    return base, x, y, {name: build_variant(name, bm, base, ns) for name in (BASELINE, PRIVATE)}
