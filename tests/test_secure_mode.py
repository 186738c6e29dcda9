"""Secure mode (NOTE [secure mode], ``fx_bk/secure_random.py``): noise and sampling from the
OS's entropy through SHAKE-256, no seed accepted, the floating-point-attack mitigation, the
right distributions, and one shared draw when the key is shared (the DDP case is in
``tests/test_ddp.py``)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fx_bk
from fx_bk import secure_random
from fx_bk.sampling import PoissonBatchSampler
from fx_bk.secure_random import SecureRandom


def test_uniforms_are_53_bit_in_the_open_interval_and_uniform():
    u = SecureRandom().uniform(200_000)
    assert u.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / 2e5))
    assert u.var().item() == pytest.approx(1 / 12, rel=0.02)
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - 20_000).abs().max().item() < 5 * math.sqrt(20_000)


def test_uniforms_are_the_shake256_stream_of_the_key(monkeypatch):
    """The bits are SHAKE-256 of a fresh 32-byte OS key: with the key fixed, an independent
    computation from hashlib gives the same numbers."""
    key = bytes(range(32))
    monkeypatch.setattr(secure_random.os, "urandom", lambda n: key[:n])
    got = SecureRandom().uniform(3)
    stream = hashlib.shake_256(key).digest(24)
    want = [((int.from_bytes(stream[8 * i:8 * i + 8], "little") >> 11) + 0.5) / 2 ** 53
            for i in range(3)]
    assert got.tolist() == want


def test_normal_is_four_box_muller_normals_halved():
    z = SecureRandom().standard_normal(200_000)
    assert z.mean().item() == pytest.approx(0.0, abs=4 / math.sqrt(2e5))
    assert z.var().item() == pytest.approx(1.0, rel=0.02)
    kurtosis = (z ** 4).mean().item() / z.var().item() ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.1)
    src = SecureRandom()
    calls = []
    original = src.uniform
    src.uniform = lambda n: calls.append(n) or original(n)
    noise = src.normal(0.5, torch.zeros(1000, dtype=torch.float32))
    assert calls == [4000] and noise.dtype == torch.float32  # 4 uniforms per coordinate
    assert noise.std().item() == pytest.approx(0.5, rel=0.1)


def test_draws_differ_unless_the_key_is_shared():
    assert not torch.equal(SecureRandom().uniform(8), SecureRandom().uniform(8))
    shared = bytes(32)
    a, b = SecureRandom(share=lambda k: shared), SecureRandom(share=lambda k: shared)
    assert torch.equal(a.normal(1.0, torch.zeros(16)), b.normal(1.0, torch.zeros(16)))


def test_secure_poisson_sampler_rate():
    sampler = PoissonBatchSampler(1000, 0.1, SecureRandom(), steps=50)
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 50
    assert sum(sizes) / 50 == pytest.approx(100, abs=4 * math.sqrt(1000 * 0.09 / 50))


def _setup(secure, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    engine = fx_bk.PrivacyEngine(secure_mode=secure)
    return engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0,
        max_grad_norm=1.0, **kwargs)


def test_secure_engine_draws_noise_and_batches_from_the_os(monkeypatch):
    calls = []
    real = secure_random.os.urandom
    monkeypatch.setattr(secure_random.os, "urandom", lambda n: calls.append(n) or real(n))
    module, opt, loader = _setup(True)
    assert isinstance(opt.random, SecureRandom)
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert isinstance(loader.batch_sampler.random, SecureRandom)
    for xb, yb in loader:  # empty batches included: the loader keeps the sample shapes
        assert xb.shape[1:] == (4,)
        opt.zero_grad()
        nn.functional.cross_entropy(module(xb), yb).backward()
        opt.step()
    # per step: one key for the batch, one per parameter's noise (weight, bias)
    assert len(calls) == 3 * len(loader) and set(calls) == {32}


def test_secure_mode_accepts_no_seed_and_needs_poisson_sampling():
    with pytest.raises(fx_bk.ConfigError, match="noise_generator"):
        _setup(True, noise_generator=torch.Generator().manual_seed(0))
    with pytest.raises(fx_bk.ConfigError, match="poisson_sampling"):
        _setup(True, poisson_sampling=False)


def test_non_secure_noise_is_opacus_draw_from_the_generator():
    """Without secure mode the noise is exactly Opacus's draw from the given generator."""
    module, opt, _ = _setup(False, noise_generator=torch.Generator().manual_seed(3))
    ref = torch.Generator().manual_seed(3)
    before = [p.detach().clone() for p in opt.params]
    for p in opt.params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(opt.params, before):  # lr 1, zero clipped sum: the update is the noise / E
        noise = torch.normal(mean=0, std=1.0, size=p.shape, generator=ref, dtype=p.dtype)
        torch.testing.assert_close(p.detach(), b - noise / opt.expected_batch_size)
