"""A privacy audit in one training run: an empirical lower bound on epsilon next to the
accountant's.

The one-run audit of Steinke, Nasr and Jagielski ("Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846): ``m`` canaries are each put in the training set independently
with probability 1/2, one DP-SGD run trains on the result, and an auditor that sees the final
model guesses "included" for the ``k+`` highest-scoring canaries and "excluded" for the ``k-``
lowest (abstaining on the others). Under (eps, delta)-DP the number of right guesses cannot be
much better than ``r = k+ + k-`` coin flips of bias ``e^eps / (1 + e^eps)``, so many right
guesses refute every eps up to ``epsilon_lower_bound(...)`` at the chosen confidence.

``audit()`` runs this against ``fx_bk.PrivacyEngine`` with gradient-space ("Dirac") canaries:
the model is one bias-free ``nn.Linear(d, p)``, the loss is ``-<output, target>`` (linear in the
output, proven per-sample by ``fx_bk.checked_criterion``), and canary ``i`` has a one-hot input
``e_j`` and target ``c * e_k``, so its per-sample gradient is ``-c * e_k e_j^T``: one weight
entry, a different one per canary, norm ``c`` above the clipping bound, clipped by fx_bk's own
backward. Ordinary examples (Gaussian inputs and targets on other input coordinates) fill the
batches. A canary's score is the change of its weight entry, ``<theta_0 - theta_T, g_i>`` for
the unit gradient ``g_i``.

    python -m fx_bk.audit --epsilon 2 --canaries 1000 --steps 10 --seed 0

A passing audit (lower bound <= epsilon) does not prove the training private; a bound above the
claimed epsilon, beyond the 1 - confidence chance, shows the run leaks more than it claims.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["AuditResult", "audit", "claimed_epsilon", "count_correct", "divide_noise",
           "epsilon_lower_bound", "main", "noise_calibrated_to", "p_value"]


def _log_binomial_pmf(r: int, eps: float) -> list[float]:
    """``log P[Binom(r, q) = k]`` for ``k = 0..r``, ``q = e^eps / (1 + e^eps)``, in float64."""
    log_q = -math.log1p(math.exp(-eps))  # log(e^eps / (1 + e^eps))
    log_not_q = -eps + log_q  # log(1 / (1 + e^eps))
    log_r = math.lgamma(r + 1)
    return [log_r - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * log_q + (r - k) * log_not_q
            for k in range(r + 1)]


def _log_sum_exp(values: Sequence[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def p_value(correct: int, guesses: int, canaries: int, epsilon: float, delta: float) -> float:
    """The probability, under (epsilon, delta)-DP, of at least ``correct`` right guesses out of
    ``guesses`` (the others abstain) about ``canaries`` canaries each included with probability
    1/2 (Steinke, Nasr and Jagielski 2023, the approximate-DP theorem; the same computation as
    their Appendix D):

        min(1, P[B >= v] + 2 m delta max_{i=1..v} P[v - i <= B < v] / i),  B ~ Binom(r, q),

    with ``v = correct``, ``r = guesses``, ``m = canaries`` and ``q = e^eps / (1 + e^eps)``.
    """
    _check_counts(correct, guesses, canaries)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if math.isinf(epsilon):
        return 1.0
    log_pmf = _log_binomial_pmf(guesses, epsilon)
    tail = math.exp(_log_sum_exp(log_pmf[correct:]))
    alpha = below = 0.0
    for i in range(1, correct + 1):
        below += math.exp(log_pmf[correct - i])  # P[v - i <= B < v]
        alpha = max(alpha, below / i)
    return min(1.0, tail + 2 * canaries * delta * alpha)


def epsilon_lower_bound(correct: int, guesses: int, canaries: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest epsilon refuted at ``confidence``: the largest eps with
    ``p_value(correct, guesses, canaries, eps, delta) <= 1 - confidence``, found by bisection
    (to 1e-9 relative); 0.0 when even eps = 0 is not refuted (no better than coin flips)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1 - confidence

    def refuted(eps: float) -> bool:
        return p_value(correct, guesses, canaries, eps, delta) <= level

    if guesses == 0 or not refuted(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while refuted(high):  # terminates: as eps grows, q -> 1 and P[B >= v] -> 1
        low, high = high, 2 * high
    while high - low > 1e-9 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if refuted(mid) else (low, mid)
    return low


def count_correct(scores: Sequence[float] | torch.Tensor, included: Sequence[bool] | torch.Tensor,
                  positive: int, negative: int) -> tuple[int, int]:
    """``(guesses, correct)``: guess "included" for the ``positive`` highest ``scores``,
    "excluded" for the ``negative`` lowest, abstain on the rest; count the right guesses against
    ``included`` (the true membership of each canary)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    included = torch.as_tensor(included, dtype=torch.bool).flatten()
    if positive < 0 or negative < 0 or positive + negative > scores.numel():
        raise ValueError(f"need 0 <= positive + negative <= {scores.numel()} canaries, got "
                         f"{positive} + {negative}")
    order = torch.argsort(scores, descending=True, stable=True)
    right = included[order[:positive]].sum() + (~included[order[scores.numel() - negative:]]).sum()
    return positive + negative, int(right)


@dataclass(frozen=True)
class AuditResult:
    """One audit run. ``epsilon_lower_bound``: the audited bound (at ``confidence``);
    ``accountant_epsilon``: what the engine's accountant reports after the run (it reads the
    optimizer's noise multiplier at each step); ``claimed_epsilon``: the accountant's epsilon
    for the intended configuration (``noise_multiplier``, ``sample_rate``, ``steps``), computed
    apart from the run: the promise the audit checks."""

    epsilon_lower_bound: float
    accountant_epsilon: float
    claimed_epsilon: float
    delta: float
    confidence: float
    canaries: int
    included: int  # canaries that were put in the training set
    guesses: int
    correct: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    scores: tuple[float, ...] = field(repr=False, default=())
    membership: tuple[bool, ...] = field(repr=False, default=())

    @property
    def violation(self) -> bool:
        """The audited lower bound exceeds the claimed epsilon: the run leaks more than the
        claim allows (a false alarm has probability at most ``1 - confidence``)."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def summary(self) -> str:
        return (f"accountant epsilon: {self.accountant_epsilon:.4f} (delta={self.delta:g})\n"
                f"audited lower bound: {self.epsilon_lower_bound:.4f} "
                f"({self.confidence:.0%} confidence; {self.correct}/{self.guesses} guesses right, "
                f"{self.canaries} canaries)")


def _linear_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i -<output_i, target_i>``: its gradient with respect to a bias-free linear layer's
    weight is ``-target_i input_i^T`` per sample, whatever the weights."""
    return -(output * target).sum(dim=1).mean()


def _dataset(canaries: int, ordinary: int, outputs: int, ordinary_dims: int, canary_norm: float,
             generator: torch.Generator):
    """Inputs, targets, canary membership and the weight entry ``(k, j)`` of each canary."""
    canary_dims = math.ceil(canaries / outputs)
    dims = canary_dims + ordinary_dims
    included = torch.rand(canaries, generator=generator) < 0.5
    entry = torch.arange(canaries)
    rows, cols = entry % outputs, entry // outputs  # a distinct weight entry per canary
    x_canary = torch.zeros(canaries, dims)
    x_canary[entry, cols] = 1.0
    t_canary = torch.zeros(canaries, outputs)
    t_canary[entry, rows] = canary_norm
    x_ordinary = torch.zeros(ordinary, dims)
    x_ordinary[:, canary_dims:] = torch.randn(ordinary, ordinary_dims, generator=generator)
    t_ordinary = torch.randn(ordinary, outputs, generator=generator)
    x = torch.cat([x_canary[included], x_ordinary])
    t = torch.cat([t_canary[included], t_ordinary])
    return x, t, included, rows, cols, dims


def claimed_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "prv") -> float:
    """Opacus's ``accountant`` epsilon for ``steps`` Poisson-subsampled Gaussian steps: what a
    correct run of that configuration promises."""
    from opacus.accountants import create_accountant

    if noise_multiplier == 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def divide_noise(factor: float) -> Callable[[torch.nn.Module, torch.optim.Optimizer], None]:
    """A ``tamper`` for ``audit``: the optimizer draws noise ``factor`` times smaller than the
    configuration claims (a broken run, for testing the audit): it divides the DP optimizer's
    ``noise_multiplier`` (the noise follows it; the accountant's hook reads it too, so the
    claim to check the run against is ``AuditResult.claimed_epsilon``)."""

    def tamper(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not hasattr(optimizer, "noise_multiplier"):
            raise TypeError(f"{type(optimizer).__name__} keeps no noise multiplier")
        optimizer.noise_multiplier = optimizer.noise_multiplier / factor

    return tamper


def noise_calibrated_to(bound: float) -> Callable[[torch.nn.Module, torch.optim.Optimizer], None]:
    """A ``tamper`` for ``audit``: the noise is calibrated to clipping bound ``bound`` whatever
    bound the module clips to (``audit(max_grad_norm=10 * R, tamper=noise_calibrated_to(R))``:
    a clipping bound 10 times larger than the noise allows; a broken run)."""

    def tamper(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.max_grad_norm = bound  # the noise's standard deviation is sigma times this

    return tamper


def audit(
    *,
    noise_multiplier: float = 4.0,
    max_grad_norm: float = 1.0,
    sample_rate: float = 0.5,
    steps: int = 10,
    canaries: int = 1000,
    ordinary: int = 500,
    positive_guesses: int = 100,
    negative_guesses: int = 100,
    delta: float = 1e-5,
    confidence: float = 0.95,
    lr: float = 1.0,
    accountant: str = "prv",
    seed: int = 0,
    canary_norm: float | None = None,
    tamper: Callable[[torch.nn.Module, torch.optim.Optimizer], None] | None = None,
) -> AuditResult:
    """Train once with ``fx_bk.PrivacyEngine`` (Poisson sampling at ``sample_rate``, rounded to
    ``1 / n`` for an integer ``n``; ``steps`` DP-SGD steps; noise ``noise_multiplier *
    max_grad_norm``) on ``canaries`` Dirac canaries (each included with probability 1/2) and
    ``ordinary`` other examples, then audit the final weights (module docstring).

    ``canary_norm``: each canary's gradient norm before clipping (default ``10 *
    max_grad_norm``). ``seed`` fixes the data, the membership, the Poisson batches and the noise.

    ``tamper(module, optimizer)``, called right after ``make_private``, may break the run on
    purpose to check that the audit notices: ``divide_noise(10)`` (less noise than claimed) or,
    with ``max_grad_norm=10``, ``noise_calibrated_to(1.0)`` (noise calibrated to a bound 10
    times smaller than the module's clipping bound). ``claimed_epsilon`` stays that of the
    configuration passed in; ``accountant_epsilon`` is what the engine reports.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from .privacy_engine import PrivacyEngine

    if steps < 1 or canaries < 1 or ordinary < 0:
        raise ValueError("need steps >= 1, canaries >= 1 and ordinary >= 0")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    generator = torch.Generator().manual_seed(seed)
    outputs = 10
    x, t, included, rows, cols, dims = _dataset(
        canaries, ordinary, outputs, ordinary_dims=20, generator=generator,
        canary_norm=10 * max_grad_norm if canary_norm is None else canary_norm)
    batches = max(1, round(1 / sample_rate))
    n = x.shape[0]
    loader = DataLoader(TensorDataset(x, t), batch_size=math.ceil(n / batches),
                        generator=torch.Generator().manual_seed(seed + 1))
    if len(loader) != batches:
        raise ValueError(f"sample_rate {sample_rate}: {n} examples do not split in {batches}")
    model = torch.nn.Linear(dims, outputs, bias=False)
    with torch.no_grad():
        model.weight.copy_(0.01 * torch.randn(outputs, dims, generator=generator))
    initial = model.weight.detach().clone()
    engine = PrivacyEngine(accountant=accountant)
    module, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, criterion=_linear_loss,
        noise_generator=torch.Generator().manual_seed(seed + 2),
    )
    if tamper is not None:
        tamper(module, optimizer)
    done = 0
    while done < steps:
        for xb, tb in loader:
            optimizer.zero_grad()
            criterion(module(xb), tb).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    # the per-sample gradient of canary i is -c e_k e_j^T, so <theta_0 - theta_T, g_i / |g_i|>
    # is the growth of the entry (k, j)
    scores = (model.weight.detach() - initial)[rows, cols].double()
    guesses, correct = count_correct(scores, included, positive_guesses, negative_guesses)
    q = 1 / batches
    return AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(correct, guesses, canaries, delta, confidence),
        accountant_epsilon=float(engine.get_epsilon(delta)),
        claimed_epsilon=claimed_epsilon(noise_multiplier, q, steps, delta, accountant),
        delta=delta, confidence=confidence, canaries=canaries, included=int(included.sum()),
        guesses=guesses, correct=correct, noise_multiplier=noise_multiplier, sample_rate=q,
        steps=steps, scores=tuple(scores.tolist()), membership=tuple(included.tolist()),
    )


def _check_counts(correct: int, guesses: int, canaries: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, "
                         f"{canaries}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fx_bk.audit``: print the accountant's epsilon and the audited lower bound;
    exit status 1 when the bound exceeds the accountant's epsilon."""
    parser = argparse.ArgumentParser(prog="python -m fx_bk.audit", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--epsilon", type=float, help="target epsilon (sets the noise)")
    noise.add_argument("--noise-multiplier", type=float, help="noise multiplier (default 4)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--ordinary", type=int, default=500, help="non-canary examples")
    parser.add_argument("--guesses", type=int, default=None,
                        help="guesses on each side (default: canaries / 10)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sample-rate", type=float, default=0.5)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sigma = args.noise_multiplier if args.noise_multiplier is not None else 4.0
    if args.epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():  # the search probes noise levels far from the answer
            warnings.simplefilter("ignore")
            sigma = get_noise_multiplier(
                target_epsilon=args.epsilon, target_delta=args.delta, accountant=args.accountant,
                sample_rate=1 / max(1, round(1 / args.sample_rate)), steps=args.steps)
    k = args.guesses if args.guesses is not None else max(1, args.canaries // 10)
    result = audit(
        noise_multiplier=sigma, sample_rate=args.sample_rate, steps=args.steps,
        canaries=args.canaries, ordinary=args.ordinary, positive_guesses=k, negative_guesses=k,
        delta=args.delta, confidence=args.confidence, accountant=args.accountant, seed=args.seed,
    )
    print(result.summary())
    return 1 if result.epsilon_lower_bound > result.accountant_epsilon else 0


if __name__ == "__main__":
    sys.exit(main())
