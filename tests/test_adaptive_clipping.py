"""Adaptive clipping (NOTE [adaptive clipping]): R converges to the target quantile of the
norms; each step clips with the current R, exactly and without a new trace or compile; the
noisy count's privacy cost is paid by larger gradient noise, so epsilon is the accountant's for
the requested noise multiplier."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

import fx_bk
from fx_bk.adaptive_clipping import AdaptiveClipState, gradient_noise_multiplier
from fx_bk.secure_random import TorchRandom
from fx_bk.testing.oracles import clip_factor, per_sample_grads


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_bound_converges_to_the_target_quantile(quantile):
    """Norms from a fixed log-normal distribution, batches of 200, count noise 200/20: after 300
    steps R sits at the distribution's quantile (within 10%)."""
    g = torch.Generator().manual_seed(0)
    state = AdaptiveClipState(fx_bk.AdaptiveClipping(target_quantile=quantile), 200.0, 1,
                              TorchRandom(g))
    bounds, tail = (1.0,), []
    for step in range(300):
        norms = torch.exp(torch.randn(200, 1, generator=g) * 0.5 + 1.0)
        bounds, _ = state.next_bounds(norms, bounds)
        if step >= 250:
            tail.append(bounds[0])
    true = math.exp(1.0 + 0.5 * math.sqrt(2) * torch.erfinv(torch.tensor(2 * quantile - 1.0))
                    .item())
    assert sum(tail) / len(tail) == pytest.approx(true, rel=0.1)


def test_counts_are_centered_and_noised_once_per_group():
    """Noise-free count (huge batch, tiny noise): the fraction is exactly the unclipped share,
    per clipping group; the update is R * exp(-eta (b - gamma))."""
    state = AdaptiveClipState(fx_bk.AdaptiveClipping(0.5, 0.2, count_noise_std=1e-9), 4.0, 2,
                              TorchRandom(torch.Generator().manual_seed(0)))
    norms = torch.tensor([[0.5, 3.0], [1.5, 3.0], [0.1, 0.1], [2.0, 0.2]])
    bounds, fraction = state.next_bounds(norms, (1.0, 2.5))
    assert fraction.tolist() == pytest.approx([0.5, 0.5])
    assert bounds == pytest.approx((1.0, 2.5))
    bounds, fraction = state.next_bounds(norms, (2.0, 0.15))
    assert fraction.tolist() == pytest.approx([1.0, 0.25])
    assert bounds == pytest.approx((2.0 * math.exp(-0.1), 0.15 * math.exp(0.05)))


def test_gradient_noise_pays_for_the_count():
    """z^-2 = sigma_grad^-2 + K / (4 sigma_b^2): one Gaussian mechanism of multiplier z."""
    for z, sb, k in [(1.0, 5.0, 1), (0.8, 2.0, 3), (2.0, 100.0, 1)]:
        s = gradient_noise_multiplier(z, sb, k)
        assert s > z
        assert s ** -2 + k / (4 * sb ** 2) == pytest.approx(z ** -2)
    with pytest.raises(fx_bk.ConfigError, match="count_noise_std=0.4 is too small"):
        gradient_noise_multiplier(1.0, 0.4, 1)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)


def _private(adaptive, sigma=1.0, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    engine = fx_bk.PrivacyEngine(accountant="rdp")
    x, y = _data()
    module, opt, crit, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=16), noise_multiplier=sigma,
        max_grad_norm=0.05, criterion=nn.CrossEntropyLoss(), adaptive_clipping=adaptive,
        **kwargs)
    return engine, model, module, opt, crit, loader


@pytest.mark.parametrize("clipping_style,clipping", [
    ("all-layer", "abadi"), ("per-layer", "abadi"), ("all-layer", "automatic"),
    ("all-layer", "global")])
def test_each_step_clips_exactly_with_the_current_bound(clipping_style, clipping):
    """Each backward's clipped sum equals the vmap oracle clipped at the bound the module holds
    then, for every clipping style and function; the bound moves from its start; the
    optimizer's noise follows the new bound."""
    engine, model, module, opt, crit, loader = _private(
        fx_bk.AdaptiveClipping(0.5, 0.5), clipping_style=clipping_style, clipping=clipping)
    bounds_seen = []
    for xb, yb in loader:
        bounds = module.current_clip_bounds
        bounds_seen.append(bounds)
        opt.zero_grad()
        crit(module(xb), yb).backward()
        per_sample = per_sample_grads(model, xb, yb)
        groups = module.bk_config.clip_groups or [[n for n, _ in model.named_parameters()]]
        for group, r in zip(groups, bounds):
            norm = torch.sqrt(sum(per_sample[n].flatten(1).pow(2).sum(1) for n in group))
            c = clip_factor(norm, r, clipping)
            for n in group:
                want = torch.einsum("b,b...->...", c, per_sample[n])
                torch.testing.assert_close(dict(model.named_parameters())[n].grad, want,
                                           rtol=1e-4, atol=1e-6)
        opt.step()
        assert opt.max_grad_norm == pytest.approx(
            math.sqrt(sum(r * r for r in module.current_clip_bounds)))
    assert bounds_seen[-1] != bounds_seen[0]


def test_epsilon_is_the_accountants_for_the_requested_multiplier():
    engine, _, module, opt, crit, loader = _private(fx_bk.AdaptiveClipping(count_noise_std=2.0))
    assert opt.noise_multiplier == 1.0
    assert opt.gradient_noise_multiplier == pytest.approx(gradient_noise_multiplier(1.0, 2.0, 1))
    for xb, yb in loader:
        opt.zero_grad()
        crit(module(xb), yb).backward()
        opt.step()
    acc = RDPAccountant()
    for _ in range(len(loader)):
        acc.step(noise_multiplier=1.0, sample_rate=1 / len(loader))
    assert engine.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5))


def test_a_new_bound_needs_no_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    bk = fx_bk.transform(model, max_grad_norm=0.01, loss_reduction="sum")
    compiled = torch.compile(bk, backend=counter, fullgraph=True)
    x, y = _data()
    norms = []
    for r in (0.01, 0.1, 1.0, 100.0):
        bk.set_clip_bounds(r)
        model.zero_grad()
        nn.functional.cross_entropy(compiled(x), y, reduction="sum").backward()
        norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item())
    assert counter.frame_count == 1
    assert norms[0] < norms[1] < norms[2] <= norms[3]
    assert norms[1] == pytest.approx(10 * norms[0], rel=1e-4)


def test_bounds_stay_float64_through_dtype_casts():
    bk = fx_bk.transform(nn.Linear(3, 2), max_grad_norm=0.1)
    bk.to(torch.bfloat16)
    assert bk.clip_bounds.dtype == torch.float64 and bk.clip_bounds.item() == 0.1
    with pytest.raises(fx_bk.ConfigError):
        bk.set_clip_bounds(-1.0)


def test_norms_of_a_discarded_backward_are_not_counted():
    """A backward whose gradients are zeroed without a step is not in the next step's count."""
    engine, _, module, opt, crit, loader = _private(fx_bk.AdaptiveClipping(count_noise_std=2.0))
    xb, yb = next(iter(loader))
    crit(module(xb), yb).backward()
    opt.zero_grad()
    crit(module(xb[:3]), yb[:3]).backward()
    seen = []
    original = opt.adaptive.next_bounds
    opt.adaptive.next_bounds = lambda norms, bounds: seen.append(norms) or original(norms, bounds)
    opt.step()
    assert seen[0].shape == (3, 1)
