"""User-level DP (NOTE [user-level DP], ``fx_bk/user_level.py``): each user's summed gradient is
clipped to R in the one backward, exactly as a loop over users computes it; one user moves the
clipped sum by at most R; the loader samples users; the accountant counts users."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

import fx_bk
from fx_bk.sampling import UserBatchSampler
from fx_bk.secure_random import TorchRandom
from fx_bk.user_level import UserLevelModule, user_criterion

K = 3  # examples per user slot


class TokenModel(nn.Module):
    """Embedding, LayerNorm, attention-free mixing over positions, Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        h = self.norm(self.emb(tokens))
        return self.head(torch.tanh(self.mix(h)).mean(1))


def _mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def _cnn():
    """Convolutions (one grouped) and a GroupNorm: ops that read one row of dim 0 at a time,
    whose per-row gradients are summed per user (``site.row_group``)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 2 * 2, 4))


def _gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                     num_labels=4, pad_token_id=0, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2ForSequenceClassification(cfg)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _batch(kind, users, g):
    if kind == "mlp":
        x = torch.randn(users, K, 6, generator=g, dtype=torch.float64)
    elif kind == "cnn":
        x = torch.randn(users, K, 3, 6, 6, generator=g, dtype=torch.float64)
    else:
        x = torch.randint(1, 20, (users, K, 5), generator=g)
    y = torch.randint(0, 4, (users, K), generator=g)
    mask = torch.rand(users, K, generator=g) > 0.3
    mask[:, 0] = True
    return x, y, mask


def _per_user_oracle(model, x, y, mask, r):
    """A loop over users: each user's summed loss, its gradient, clipped to r, summed."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for u in range(x.shape[0]):
        model.zero_grad()
        out = _logits(model(x[u][mask[u]]))
        nn.functional.cross_entropy(out, y[u][mask[u]], reduction="sum").backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = math.sqrt(sum((v ** 2).sum().item() for v in grads.values()))
        c = min(1.0, r / (norm + 1e-6))
        for n in total:
            total[n] += c * grads[n]
    return total


def _fx_bk_sum(model, x, y, mask, r):
    bk = fx_bk.transform(UserLevelModule(model, K), max_grad_norm=r, loss_reduction="sum")
    loss = user_criterion(nn.CrossEntropyLoss(), "sum")
    model.zero_grad()
    loss(_logits(bk(x)), y, mask).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens", "gpt2"])
def test_users_are_clipped_jointly_exactly(kind):
    torch.manual_seed(0)
    model = {"mlp": _mlp, "cnn": _cnn, "tokens": TokenModel, "gpt2": _gpt2}[kind]().double()
    x, y, mask = _batch(kind, 5, torch.Generator().manual_seed(1))
    want = _per_user_oracle(model, x, y, mask, r=0.2)
    got = _fx_bk_sum(model, x, y, mask, r=0.2)
    for n in want:
        scale = want[n].abs().max().clamp_min(1e-30)
        assert ((got[n] - want[n]).abs().max() / scale).item() < 1e-10, n


@pytest.mark.parametrize("seed", range(4))
def test_one_user_moves_the_clipped_sum_by_at_most_r(seed):
    """Remove-one sensitivity over random models: the clipped sums with and without one user
    differ by at most R, although each of that user's examples alone stays under R (clipping
    examples one by one would let the user move the sum by K times as much)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kind = ("tokens", "mlp", "cnn", "mlp")[seed]
    model = {"mlp": _mlp, "cnn": _cnn, "tokens": TokenModel}[kind]().double()
    x, y, mask = _batch(kind, 6, g)
    mask[0] = True  # user 0 brings K examples
    per_example = []
    for k in range(K):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[0, k:k + 1]), y[0, k:k + 1], reduction="sum") \
            .backward()
        per_example.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    r = 1.01 * max(v.norm().item() for v in per_example)  # every example alone is unclipped
    user_norm = torch.stack(per_example).sum(0).norm().item()
    with_all = _fx_bk_sum(model, x, y, mask, r)
    without = _fx_bk_sum(model, x[1:], y[1:], mask[1:], r)
    moved = math.sqrt(sum(((with_all[n] - without[n]) ** 2).sum().item() for n in with_all))
    assert moved <= r * (1 + 1e-9)
    if user_norm > r:  # joint clipping did something example-level clipping would not
        assert moved == pytest.approx(r, rel=1e-6)


def test_a_layer_that_cannot_read_the_fold_is_rejected_by_name():
    """The vmap fallback (PReLU has no dedicated rule) cannot tell a user's rows apart from
    each other's: rejected, never clipped per example."""
    model = nn.Sequential(nn.Linear(6, 4), nn.PReLU(4), nn.Linear(4, 4))
    bk = fx_bk.transform(UserLevelModule(model, K), max_grad_norm=1.0)
    with pytest.raises(fx_bk.UnsupportedModelError, match="prelu.*module.1.weight"):
        bk(torch.randn(2, K, 6))


def test_an_argument_without_the_user_slots_is_an_error():
    bk = fx_bk.transform(UserLevelModule(_mlp(), K), max_grad_norm=1.0)
    with pytest.raises(fx_bk.ConfigError, match=r"every tensor argument is \[users, 3"):
        bk(torch.randn(4, 6))


def test_the_sampler_draws_users_at_the_rate_and_caps_their_examples():
    user_ids = [i % 10 for i in range(60)]  # 10 users, 6 examples each
    sampler = UserBatchSampler(user_ids, 0.3, max_examples=4, random=TorchRandom(
        torch.Generator().manual_seed(0)), steps=400)
    counts = []
    for slots in sampler:
        assert len(slots) % 4 == 0
        for u in range(len(slots) // 4):
            mine = slots[4 * u:4 * u + 4]
            assert all(s >= 0 for s in mine)  # 6 examples: 4 real slots, no padding
            assert len({user_ids[s] for s in mine}) == 1 and len(set(mine)) == 4
        counts.append(len(slots) // 4)
    mean, sd = sum(counts) / len(counts), math.sqrt(10 * 0.3 * 0.7 / len(counts))
    assert abs(mean - 3.0) < 4 * sd


def _engine_run(noise, steps_seen=None, **kwargs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    users = torch.arange(40) % 8  # 8 users, 5 examples each
    torch.manual_seed(0)
    model = _mlp()
    engine = fx_bk.PrivacyEngine(accountant="rdp")
    module, opt, crit, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=2, generator=g),
        noise_multiplier=noise, max_grad_norm=0.5, criterion=nn.CrossEntropyLoss(),
        privacy_unit=fx_bk.UserLevel(users, max_examples=K), **kwargs)
    return engine, model, module, opt, crit, loader


def test_engine_user_level_steps_and_accounts_users():
    engine, model, module, opt, crit, loader = _engine_run(1.0)
    assert len(loader) == 4 and opt.expected_batch_size == 2  # 8 users, 2 expected per step
    assert loader.batch_sampler.sample_rate == 2 / 8  # the rate the accountant is given
    shapes = []
    for (xb, yb), mask in loader:
        assert xb.shape[1:] == (K, 6) and mask.shape == yb.shape == xb.shape[:2]
        shapes.append(xb.shape[0])
        opt.zero_grad()
        crit(module(xb), yb, mask).backward()
        opt.step()
    acc = RDPAccountant()
    for _ in range(4):
        acc.step(noise_multiplier=1.0, sample_rate=2 / 8)
    assert engine.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5))


def test_engine_user_level_update_is_the_per_user_clipped_mean():
    """Noise off: one step is -lr * (sum of per-user clipped gradients) / expected users, the
    users' examples being at most K of theirs (an empty batch steps with zero)."""
    _, model, module, opt, crit, loader = _engine_run(0.0)
    (xb, yb), mask = next(iter(loader))
    before = [p.detach().clone() for p in model.parameters()]
    want = _per_user_oracle(model, xb, yb, mask, r=0.5)
    opt.zero_grad()
    crit(module(xb), yb, mask).backward()
    opt.step()
    for (name, _), p, b in zip(model.named_parameters(), model.parameters(), before):
        torch.testing.assert_close(p.detach(), b - 0.5 * want[name] / 2, rtol=1e-5, atol=1e-6)


def test_public_expected_batch_size_is_the_normalizer():
    _, _, _, opt, _, _ = _engine_run(1.0, expected_batch_size=3)
    assert opt.expected_batch_size == 3


def test_the_sampling_rate_is_the_accountants_when_users_do_not_divide_evenly():
    """8 users, 3 per step: the loader samples at q = 3/8 and the accountant is given 3/8 (not
    1 / round(8 / 3)); an epoch is round(8 / 3) = 3 steps."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    model = _mlp()
    engine = fx_bk.PrivacyEngine(accountant="rdp")
    module, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=3), noise_multiplier=1.0,
        max_grad_norm=1.0, privacy_unit=fx_bk.UserLevel(torch.arange(16) % 8, max_examples=2))
    assert loader.batch_sampler.sample_rate == 3 / 8 and len(loader) == 3
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert engine.accountant.history == [(1.0, 3 / 8, 1)]
