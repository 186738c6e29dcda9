"""fx_bk.audit: the one-run lower bound on epsilon (Steinke, Nasr and Jagielski 2023) against
independent computations, a correct fx_bk run staying below its accountant's epsilon, and
deliberately broken runs (less noise, a larger clipping bound than the noise is calibrated to)
caught above the claimed epsilon."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fx_bk.audit import (
    AuditResult,
    audit,
    count_correct,
    divide_noise,
    epsilon_lower_bound,
    main,
    noise_calibrated_to,
    p_value,
)

LEVEL = 0.05  # 1 - confidence


def _logit(q: float) -> float:
    return math.log(q / (1 - q))


# --- the bound ------------------------------------------------------------------------------


@pytest.mark.parametrize("guesses", [1, 10, 60, 200, 1000])
def test_all_correct_pure_dp_has_a_closed_form(guesses):
    # delta = 0, every guess right: p = q^r, so the bound is logit(level^(1/r))
    expected = max(_logit(LEVEL ** (1 / guesses)), 0.0)
    got = epsilon_lower_bound(guesses, guesses, guesses, delta=0.0)
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-9)


def _binomial_tail(v: int, r: int, q: float) -> float:
    """P[Binom(r, q) >= v] by summing the pmf directly (math.comb, no logs)."""
    return sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))


@pytest.mark.parametrize("correct,guesses", [(10, 10), (18, 20), (40, 50), (70, 100),
                                             (150, 200), (30, 50)])
def test_pure_dp_matches_a_brute_force_search(correct, guesses):
    # the largest eps on a fine grid whose exact binomial tail is still <= level
    grid = [i / 1000 for i in range(0, 8001)]
    refuted = [e for e in grid if _binomial_tail(correct, guesses, 1 / (1 + math.exp(-e))) <= LEVEL]
    brute = max(refuted) if refuted else 0.0
    got = epsilon_lower_bound(correct, guesses, 1000, delta=0.0)
    assert brute <= got < brute + 1e-3 + 1e-9


def test_p_value_matches_scipy_port_of_the_formula():
    stats = pytest.importorskip("scipy.stats")
    for m, r, v, eps, delta in [(1000, 200, 150, 1.0, 1e-5), (1000, 200, 190, 3.0, 1e-5),
                                (500, 100, 100, 4.0, 1e-3), (100, 50, 30, 0.5, 0.01),
                                (1000, 200, 120, 0.2, 0.0), (50, 50, 49, 2.0, 1e-2)]:
        q = 1 / (1 + math.exp(-eps))
        tail = stats.binom.sf(v - 1, r, q)
        cumulative = [stats.binom.sf(v - i - 1, r, q) - tail for i in range(1, v + 1)]
        alpha = max((c / i for i, c in enumerate(cumulative, 1)), default=0.0)
        expected = min(1.0, tail + 2 * m * delta * alpha)
        assert p_value(v, r, m, eps, delta) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_bound_with_delta_matches_bisection_on_scipy():
    stats = pytest.importorskip("scipy.stats")
    m, r, v, delta = 1000, 200, 180, 1e-5

    def p(eps):
        q = 1 / (1 + math.exp(-eps))
        tail = stats.binom.sf(v - 1, r, q)
        alpha = max((stats.binom.sf(v - i - 1, r, q) - tail) / i for i in range(1, v + 1))
        return min(1.0, tail + 2 * m * delta * alpha)

    got = epsilon_lower_bound(v, r, m, delta)
    assert p(got) <= LEVEL < p(got + 1e-6)
    assert got < epsilon_lower_bound(v, r, m, 0.0)  # delta only weakens the bound


def test_bound_is_monotone_and_zero_near_coin_flips():
    bounds = [epsilon_lower_bound(c, 200, 1000, 1e-5) for c in range(0, 201)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[100] == 0.0 and bounds[110] == 0.0  # p(eps=0) = P[Binom(200, 1/2) >= v]
    assert bounds[200] > bounds[150] > 0
    all_right = [epsilon_lower_bound(r, r, 1000, 1e-5) for r in (10, 50, 100, 200, 500)]
    assert all(a < b for a, b in zip(all_right, all_right[1:]))
    assert epsilon_lower_bound(0, 0, 10, 1e-5) == 0.0
    # a stricter confidence gives a smaller bound
    assert epsilon_lower_bound(180, 200, 1000, 1e-5, 0.99) < epsilon_lower_bound(180, 200, 1000,
                                                                                1e-5, 0.9)


def test_bound_rejects_impossible_counts():
    with pytest.raises(ValueError):
        epsilon_lower_bound(11, 10, 100, 1e-5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(5, 10, 5, 1e-5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(5, 10, 100, 1e-5, confidence=1.0)


def test_count_correct():
    scores = [5.0, -1.0, 3.0, 0.0, -4.0, 2.0]
    included = [True, False, False, True, False, True]
    # top 2: 5.0 (in, right), 3.0 (out, wrong); bottom 2: -4.0 (out, right), -1.0 (out, right)
    assert count_correct(scores, included, 2, 2) == (4, 3)
    assert count_correct(scores, included, 0, 0) == (0, 0)
    with pytest.raises(ValueError):
        count_correct(scores, included, 4, 3)


# --- the audit of fx_bk ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet_accountant():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def test_canaries_go_through_fx_bk_clipping():
    # without noise every included canary moves its weight entry by exactly R / B per
    # inclusion (clipped from norm 10 R) and an excluded one not at all
    r = audit(noise_multiplier=0.0, canaries=200, ordinary=100, positive_guesses=20,
              negative_guesses=20, seed=3)
    scores, member = torch.tensor(r.scores), torch.tensor(r.membership)
    batch = int((r.included + 100) * r.sample_rate)
    steps = scores[member] * batch
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.min() >= 0.99
    assert steps.max() <= r.steps + 1e-4
    assert scores[~member].abs().max() == 0
    assert r.correct == r.guesses and math.isinf(r.claimed_epsilon)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_run_stays_below_the_accountant(seed):
    r = audit(seed=seed)
    assert isinstance(r, AuditResult) and r.guesses == 200 and r.canaries == 1000
    assert r.accountant_epsilon == pytest.approx(r.claimed_epsilon)
    assert 1.0 < r.claimed_epsilon < 2.0
    assert r.epsilon_lower_bound < r.claimed_epsilon and not r.violation


def test_same_seed_same_run():
    kwargs = dict(canaries=200, ordinary=50, positive_guesses=20, negative_guesses=20, steps=3)
    a, b = audit(seed=5, **kwargs), audit(seed=5, **kwargs)
    assert a.scores == b.scores and a.membership == b.membership and a == b
    assert audit(seed=6, **kwargs).scores != a.scores


def test_tamper_hooks_set_the_optimizer():
    class Optimizer:
        noise_multiplier = 4.0
        max_grad_norm = 10.0

    opt = Optimizer()
    divide_noise(10)(None, opt)
    assert opt.noise_multiplier == 0.4
    noise_calibrated_to(1.0)(None, opt)
    assert opt.max_grad_norm == 1.0
    with pytest.raises(TypeError):
        divide_noise(2)(None, object())


def test_divided_noise_multiplier_is_caught():
    r = audit(tamper=divide_noise(10))
    assert r.claimed_epsilon < 2.0
    assert r.accountant_epsilon > 10  # the accountant hook reads the lowered multiplier
    assert r.violation and r.epsilon_lower_bound > 2 * r.claimed_epsilon


def test_multiplied_clipping_bound_is_caught():
    r = audit(max_grad_norm=10.0, tamper=noise_calibrated_to(1.0))
    assert r.accountant_epsilon == pytest.approx(r.claimed_epsilon)  # the accountant is fooled
    assert r.violation and r.epsilon_lower_bound > 2 * r.claimed_epsilon


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 13))
def test_correct_run_stays_below_more_seeds(seed):
    r = audit(seed=seed)
    assert r.epsilon_lower_bound < r.claimed_epsilon


@pytest.mark.slow
def test_noise_divided_by_four_is_caught():
    r = audit(tamper=divide_noise(4))
    assert r.violation


def test_command_line(capsys):
    status = main(["--noise-multiplier", "2", "--canaries", "300", "--ordinary", "100",
                   "--steps", "4", "--guesses", "30", "--accountant", "rdp", "--seed", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and len(lines) == 2
    assert lines[0].startswith("accountant epsilon: ") and "delta=1e-05" in lines[0]
    assert lines[1].startswith("audited lower bound: ") and "/60 guesses right" in lines[1]
    accountant = float(lines[0].split()[2])
    bound = float(lines[1].split()[3])
    assert 0 <= bound < accountant


def test_command_line_with_target_epsilon(capsys):
    main(["--epsilon", "1.5", "--canaries", "200", "--ordinary", "50", "--steps", "4",
          "--accountant", "rdp"])
    first = capsys.readouterr().out.splitlines()[0]
    assert 1.3 < float(first.split()[2]) <= 1.5
