"""fx_bk.PrivacyEngine: same epsilon as Opacus, noise of the stated size added once per logical
step, Poisson batches (empty ones too) without recompiles, gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine as OpacusEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

import fx_bk


def _data(n=64, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long() % classes)


def _model(d=6, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))


def _batches(loader, steps):
    n = 0
    while True:
        for batch in loader:
            if n == steps:
                return
            n += 1
            yield batch


def _train(module, optimizer, loader, steps):
    for x, y in _batches(loader, steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_epsilon_identical_to_opacus(accountant):
    data = _data()
    ours, theirs = fx_bk.PrivacyEngine(accountant=accountant), OpacusEngine(accountant=accountant)
    for engine in (ours, theirs):
        model = _model()
        module, opt, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.1, max_grad_norm=1.0,
        )
        _train(module, opt, loader, steps=5)
    assert len(ours.accountant) > 0
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-12)


def test_make_private_with_epsilon_matches_opacus():
    data = _data()
    sigmas, eps = [], []
    for engine in (fx_bk.PrivacyEngine(accountant="rdp"), OpacusEngine(accountant="rdp")):
        model = _model()
        module, opt, loader = engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=8), target_epsilon=3.0, target_delta=1e-5,
            epochs=2, max_grad_norm=1.0,
        )
        sigmas.append(opt.noise_multiplier)
        _train(module, opt, loader, steps=2 * len(loader))
        eps.append(engine.get_epsilon(1e-5))
    assert sigmas[0] == sigmas[1]
    assert eps[0] == pytest.approx(eps[1], rel=1e-12) and eps[0] <= 3.0 + 1e-3


@pytest.mark.parametrize("style, bound", [("all-layer", 0.5), ("per-layer", 0.5 / 2**0.5)])
def test_noise_std(style, bound):
    """``p.grad`` after the step is ``(clipped sum + N(0, (sigma R)^2)) / E``; the noise std is
    measured over 10 steps x 4.8k coordinates (sd of the estimate ~0.3%)."""
    sigma, sensitivity = 0.7, 0.5
    model = nn.Sequential(nn.Linear(40, 100), nn.Tanh(), nn.Linear(100, 8))
    data = TensorDataset(torch.randn(256, 40), torch.randint(0, 8, (256,)))
    module, opt, loader = fx_bk.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(data, batch_size=32), noise_multiplier=sigma,
        max_grad_norm=bound, clipping_style=style,
    )
    noise = []
    for x, y in _batches(loader, 10):
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        clipped = [p.grad.clone() for p in model.parameters()]
        opt.step()  # lr 0: only p.grad changes
        noise += [(p.grad * opt.expected_batch_size - c).flatten()
                  for p, c in zip(model.parameters(), clipped)]
    noise = torch.cat(noise)
    assert noise.numel() > 40_000
    assert noise.std().item() == pytest.approx(sigma * sensitivity, rel=0.03)
    assert abs(noise.mean().item()) < 0.03 * sigma * sensitivity


def test_poisson_training_compiles_at_most_twice():
    """50 compiled steps on Poisson batches (a new batch size nearly every step)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    model = _model()
    module, opt, loader = fx_bk.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_data(n=800), batch_size=16), noise_multiplier=1.0,
        max_grad_norm=1.0, compile={"backend": counter},
    )
    sizes = []
    for x, y in _batches(loader, 50):
        sizes.append(len(x))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert len(set(sizes)) > 5, sizes
    assert counter.frame_count <= 2, (counter.frame_count, sizes)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_empty_batch_gives_zero_clipped_sum_plus_noise(compiled):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    module, opt, _ = fx_bk.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=0.0,
        max_grad_norm=1.0, compile=compiled,
    )
    x, y = torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)
    opt.zero_grad()
    nn.functional.cross_entropy(module(x), y).backward()  # NaN loss: a mean over nothing
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    opt.noise_multiplier = 1.0  # and with noise, the update is the noise alone
    opt.zero_grad()
    nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"])


def test_empty_batch_of_a_language_model():
    """Hugging Face attention cannot run on zero rows (it reshapes ``[0, T, -1, h]``): the
    empty Poisson batch still gives zero-row logits and an exactly zero clipped sum."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        use_cache=False))
    ids = torch.zeros(0, 8, dtype=torch.long)
    with pytest.raises(RuntimeError):
        model(input_ids=ids)  # what the empty batch has to work around
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    logits = bk(input_ids=ids).logits
    assert logits.shape == (0, 8, 64)
    fx_bk.sequence_cross_entropy(logits, ids, shift=True).sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_epsilon_without_noise_is_infinite():
    engine = fx_bk.PrivacyEngine(accountant="prv")
    model = _model()
    module, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=0.0, max_grad_norm=1.0)
    _train(module, opt, loader, steps=1)
    assert engine.get_epsilon(1e-5) == float("inf")


def _engine_step(micro_batches, use_manager, seed, sigma=0.0, logical=None):
    """One logical step of a fresh model from several micro-batches; returns the new params."""
    model = _model()
    data = _data()
    module, opt, _ = fx_bk.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=sigma, max_grad_norm=0.3,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    opt.zero_grad()
    for k, (x, y) in enumerate(micro_batches):
        if use_manager:  # what opacus.utils.batch_memory_manager.BatchMemoryManager signals
            opt.signal_skip_step(do_skip=k < len(micro_batches) - 1)
        nn.functional.cross_entropy(module(x), y).backward()
        if use_manager:
            opt.step()
            opt.zero_grad()
    if not use_manager:
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("use_manager", [False, True], ids=["no-zero-grad", "skip-signals"])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_accumulation_equals_one_big_batch(use_manager, sigma):
    x, y = _data().tensors
    big = _engine_step([(x[:24], y[:24])], use_manager=False, seed=3, sigma=sigma)
    parts = [(x[:5], y[:5]), (x[5:16], y[5:16]), (x[16:24], y[16:24])]
    acc = _engine_step(parts, use_manager, seed=3, sigma=sigma)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-5, atol=1e-6)


def test_batch_memory_manager_runs_with_fx_bk():
    """Opacus's BatchMemoryManager splits Poisson batches for fx_bk's optimizer too."""
    model = _model()
    engine = fx_bk.PrivacyEngine()
    module, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(n=128), batch_size=32), noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8,
                            optimizer=opt) as physical:
        for x, y in physical:
            assert len(x) <= 8
            opt.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            opt.step()
    assert len(engine.accountant) > 0 and engine.get_epsilon(1e-5) > 0
