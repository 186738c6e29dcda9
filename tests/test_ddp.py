"""DistributedDataParallel over an fx_bk module: 2 processes, gloo, on this machine.

DDP averages the ranks' clipped sums; with the engine's optimizer the update equals one process's
on the concatenated batch, noise off; with noise on, every rank adds the same noise (one shared
seed) scaled so that it is added once overall: the ranks stay identical and the noise in the
update has the single-process standard deviation ``sigma R / E``. The same holds in secure mode
(rank 0's key shared) and with adaptive clipping (the counts summed over the ranks, one noisy
count: every rank gets the same new bound).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fx_bk

from .ranks import save_result, spawn_ranks, start_rank

WORLD, N, R, SIGMA = 2, 64, 0.3, 0.8
COUNT_STD = 1.0  # adaptive clipping: the gradient noise multiplier is then 0.873, not 0.8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 64), nn.Tanh(), nn.Linear(64, 5))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 30, generator=g), torch.randint(0, 5, (N,), generator=g)


def _private(model, sigma, secure=False, **kwargs):
    x, y = _data()
    return fx_bk.PrivacyEngine(secure_mode=secure).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=16), noise_multiplier=sigma,
        max_grad_norm=R, **kwargs,
    )


VARIANTS = {0.0: (0.0, {}), SIGMA: (SIGMA, {}), "secure": (SIGMA, {"secure": True}),
            "adaptive": (SIGMA, {"adaptive_clipping": fx_bk.AdaptiveClipping(
                count_noise_std=COUNT_STD)})}


def _worker(rank, init_file, out_dir):
    start_rank(rank, WORLD, init_file, out_dir, stacks_after_s=STACKS_AFTER_S)
    x, y = _data()
    mine = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    results = {}
    for name, (sigma, kwargs) in VARIANTS.items():
        model = _model()
        module, opt, _ = _private(model, sigma, **kwargs)
        ddp = nn.parallel.DistributedDataParallel(module)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[mine]), y[mine]).backward()
        averaged = [p.grad.clone() for p in model.parameters()]
        expected = opt.expected_batch_size
        opt.step()
        results[name] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "grad_avg": averaged, "expected": expected, "bound": opt.max_grad_norm,
        }
    save_result(rank, out_dir, results)


DEADLINE_S = 300
STACKS_AFTER_S = 120


@pytest.fixture(scope="module")
def ranks():
    return spawn_ranks(_worker, (), WORLD, "DDP", DEADLINE_S, STACKS_AFTER_S)


def _single_process(sigma):
    model = _model()
    module, opt, _ = _private(model, sigma)
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(module(x), y).backward()
    clipped = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return model, clipped, opt.expected_batch_size


def test_ddp_update_equals_one_process_on_the_whole_batch(ranks):
    model, clipped, expected = _single_process(0.0)
    for r in ranks:
        assert r[0.0]["expected"] * WORLD == expected
        for avg, full in zip(r[0.0]["grad_avg"], clipped):  # DDP averages the clipped sums
            torch.testing.assert_close(avg * WORLD, full, rtol=1e-5, atol=1e-6)
        for got, want in zip(r[0.0]["params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


def test_ddp_noise_added_once_overall(ranks):
    noise_free = ranks[0][0.0]["params"]
    for got, other in zip(ranks[0][SIGMA]["params"], ranks[1][SIGMA]["params"]):
        assert torch.equal(got, other)  # the same noise on every rank
    _, _, expected = _single_process(0.0)
    noise = torch.cat([(a - b).flatten() for a, b in zip(noise_free, ranks[0][SIGMA]["params"])])
    # update noise = N(0, (sigma R)^2) / E_total: once, not W times (W times: std * sqrt(W))
    assert noise.std().item() == pytest.approx(SIGMA * R / expected, rel=0.05)


@pytest.mark.parametrize("variant", ["secure", "adaptive"])
def test_ddp_secure_and_adaptive_ranks_stay_identical(ranks, variant):
    """Secure mode: rank 0's key, shared, gives every rank the same noise of the right size;
    adaptive clipping: the same new bound on every rank, moved from R."""
    for got, other in zip(ranks[0][variant]["params"], ranks[1][variant]["params"]):
        assert torch.equal(got, other)
    assert ranks[0][variant]["bound"] == ranks[1][variant]["bound"]
    noise_free = ranks[0][0.0]["params"]
    noise = torch.cat([(a - b).flatten() for a, b in zip(noise_free, ranks[0][variant]["params"])])
    expected = ranks[0][0.0]["expected"] * WORLD
    sigma = SIGMA
    if variant == "adaptive":  # the gradient noise is larger (the count's share of the budget)
        assert ranks[0][variant]["bound"] != pytest.approx(R)
        sigma = (SIGMA ** -2 - 1 / (4 * COUNT_STD ** 2)) ** -0.5
    assert noise.std().item() == pytest.approx(sigma * R / expected, rel=0.04)
