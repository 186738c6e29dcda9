"""DP-SGD on a small transformer classifier with ``fx_bk.PrivacyEngine``: ``python -m fx_bk.demo``.

The task is synthetic (``fx_bk.models.synthetic_token_task``: token sequences labelled by their
most frequent token group), so nothing is downloaded. The training set is a ``TensorDataset``
behind a ``DataLoader``; ``fx_bk.PrivacyEngine().make_private`` (or ``make_private_with_epsilon``
with ``--target-epsilon``) turns the model, optimizer and loader into:

* the model transformed by ``fx_bk.transform`` and compiled with ``torch.compile(fullgraph=True)``
  (``--no-compile``: eager): one forward and one backward leave the clipped per-sample gradient
  sum ``sum_i C_i grad l_i`` in every ``p.grad``;
* Opacus's ``DPOptimizerFastGradientClipping``: adds ``N(0, (sigma R)^2)`` noise, divides by the
  expected batch size and steps the wrapped optimizer (Adam here);
* a Poisson-sampling loader: each sample joins a batch with probability ``B / n``, so batch sizes
  vary around ``B`` (the loss is a mean over the actual batch);

and the privacy accountant (PRV by default) records every step: the progress bar shows epsilon
at ``--delta``. At the end: held-out accuracy, final epsilon, median step time (forward + loss +
backward + noisy optimizer step; the first ``--warmup`` steps, which include compilation, are
excluded) and a PNG of loss and epsilon against the step (``--plot``).

``--compare`` trains two more copies of the same initial model on the same batches (the same
Poisson draws) in the same loop, one step of each variant in turn so that load changes on the
machine hit all of them alike: non-private training (the plain model, compiled unless
``--no-compile``) and Opacus 1.6 ghost clipping (what ``opacus.PrivacyEngine().make_private(...,
grad_sample_mode="ghost")`` builds: hooks and two backward passes, eager: Opacus does not
compile), with the same noise seed and an accountant of the same kind; then prints a table of
median step times, their ratios, accuracies and epsilons. Both are built by the benchmark's step
builders (``benchmarks/variants.py``, with Adam, noise and the accountant), so ``--compare`` runs
from the repository root.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import fx_bk
from fx_bk.models import TinyTransformer, synthetic_token_task
from fx_bk.privacy_engine import DynamicBatchLoader

VOCAB, N_CLASSES = 64, 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fx_bk.demo", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=("classify", "lm"), default="classify",
                   help="lm: DP LoRA fine-tuning of a tiny Llama through the Hugging Face "
                        "Trainer (python -m fx_bk.demo --task lm --help)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128,
                   help="expected (Poisson) batch size B; sample rate B / n-train")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--n-test", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound R")
    p.add_argument("--noise-multiplier", type=float, default=1.0,
                   help="sigma (ignored with --target-epsilon)")
    p.add_argument("--target-epsilon", type=float, default=None,
                   help="choose sigma so that epsilon reaches this after --steps steps "
                        "(make_private_with_epsilon)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=("prv", "rdp", "gdp"), default="prv")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile(fullgraph=True) the fx_bk module (and the non-private "
                        "model with --compare)")
    p.add_argument("--compare", action="store_true",
                   help="also train non-private and with Opacus ghost clipping; print step-time "
                        "ratios (run from the repository root: uses benchmarks/variants.py)")
    p.add_argument("--warmup", type=int, default=3,
                   help="first steps (compilation) left out of the step-time medians")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between epsilon evaluations (progress bar and plot)")
    p.add_argument("--plot", default="demo_dp_training.png",
                   help="PNG of loss and epsilon vs step ('' for none)")
    p.add_argument("--user-level", type=int, default=0, metavar="K",
                   help="user-level DP: users of K examples each (K > 0), each user's summed "
                        "gradient clipped to R; --batch-size counts examples (batch-size / K "
                        "users per step)")
    p.add_argument("--audit", action="store_true",
                   help="after training, audit the engine at the same noise multiplier, "
                        "sampling rate and steps with canaries (python -m fx_bk.audit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if not 0 < args.batch_size <= args.n_train:
        p.error(f"--batch-size must be in 1..--n-train ({args.n_train}), got {args.batch_size}")
    return args


@dataclass
class Variant:
    """One way of training: ``step(x, y) -> (loss, logits)`` does a full optimizer step."""

    name: str
    model: torch.nn.Module  # the plain model (shares its parameters with the wrapped one)
    step: object
    accountant: object = None  # privacy accountant (get_epsilon), None if non-private
    sigma: float | None = None
    step_s: list[float] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, batch mean loss)
    eps: list[tuple[int, float]] = field(default_factory=lambda: [(0, 0.0)])  # (step, epsilon)
    window: list[float] = field(default_factory=lambda: [0.0, 0, 0])  # loss sum, correct, n
    test_acc: float = float("nan")

    def median_ms(self, warmup: int) -> float:
        return 1e3 * statistics.median(self.step_s[warmup:])

    def epsilon(self, delta: float) -> float | None:
        return None if self.accountant is None else self.accountant.get_epsilon(delta)


def _fx_bk_variant(model, loader, args, noise_seed) -> tuple[Variant, DataLoader]:
    engine = fx_bk.PrivacyEngine(accountant=args.accountant)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    common = dict(module=model, optimizer=opt, data_loader=loader, criterion=F.cross_entropy,
                  max_grad_norm=args.max_grad_norm, compile=args.compile,
                  noise_generator=torch.Generator().manual_seed(noise_seed))
    if args.user_level:  # user u owns examples u*K .. u*K + K - 1
        users = torch.arange(len(loader.dataset)) // args.user_level
        common["privacy_unit"] = fx_bk.UserLevel(users, max_examples=args.user_level)
    if args.target_epsilon is not None:
        epochs = args.steps / len(loader)  # Opacus's search runs int(epochs * len) steps
        while int(epochs * len(loader)) < args.steps:
            epochs = math.nextafter(epochs, math.inf)
        module, dp_opt, criterion, dp_loader = engine.make_private_with_epsilon(
            target_epsilon=args.target_epsilon, target_delta=args.delta, epochs=epochs, **common)
    else:
        module, dp_opt, criterion, dp_loader = engine.make_private(
            noise_multiplier=args.noise_multiplier, **common)

    def step(x, y, mask=None):
        dp_opt.zero_grad(set_to_none=True)
        logits = module(x)  # [b, n_classes]; b varies (Poisson), may be 0
        # proven mean over the b samples (NaN if b == 0); user-level: [users, K, ...] and mask
        loss = criterion(logits, y) if mask is None else criterion(logits, y, mask)
        loss.backward()  # p.grad = sum_i C_i grad l_i: clipped sum, one backward
        dp_opt.step()  # + N(0, (sigma R)^2), / expected B, Adam; accountant records the step
        return loss.detach(), logits.detach()

    name = f"fx_bk {'compiled' if args.compile else 'eager'}"
    return Variant(name, model, step, engine.accountant, dp_opt.noise_multiplier), dp_loader


def _compare_variants(base, args, sample_rate: float, sigma: float,
                      noise_seed: int) -> list[Variant]:
    """``--compare``'s non-private and Opacus ghost-clipping variants, each on a copy of ``base``,
    from ``benchmarks/variants.py`` (the benchmark's step builders): Adam; Opacus with the noise
    multiplier, noise seed and Poisson sample rate of fx_bk's run and its own accountant, as
    ``opacus.PrivacyEngine.make_private`` sets them up."""
    try:
        from benchmarks import variants
    except ImportError as e:
        if not (e.name or "").startswith("benchmarks"):
            raise
        raise RuntimeError(
            "--compare builds its non-private and Opacus variants with benchmarks/variants.py, "
            f"which is not importable here ({e}): run `python -m fx_bk.demo --compare` from the "
            "root of a checkout of the fx_bk repository") from e
    from opacus.accountants import create_accountant

    def adam(params):
        return torch.optim.Adam(params, lr=args.lr)

    plain = variants.plain(
        copy.deepcopy(base), optimizer=adam, loss_fn=F.cross_entropy, compiled=args.compile,
        dynamic_batch=True, name=f"non-private {'compiled' if args.compile else 'eager'}")
    accountant = create_accountant(args.accountant)
    ghost = variants.opacus_ghost(
        copy.deepcopy(base), optimizer=adam, max_grad_norm=args.max_grad_norm,
        expected_batch_size=int(args.n_train * sample_rate), noise_multiplier=sigma,
        generator=torch.Generator().manual_seed(noise_seed), accountant=accountant,
        sample_rate=sample_rate, name="Opacus ghost eager")
    return [Variant(plain.name, plain.model, _outputs(plain.step_fn)),
            Variant(ghost.name, ghost.model, _outputs(ghost.step_fn), accountant, sigma)]


def _outputs(step_fn):
    """``(x, y) -> (loss, logits)``, detached, of a ``benchmarks.variants`` step."""

    def step(x, y):
        out = step_fn(x, y, keep_outputs=True)
        return out.loss, out.out

    return step


def _batches(loader, steps):
    n = 0
    while True:
        for batch in loader:
            if n == steps:
                return
            n += 1
            yield batch


def _plot(variants: list[Variant], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eps) = plt.subplots(1, 2, figsize=(11, 4))
    k = max(1, args.steps // 20)  # moving-average window over steps
    for i, v in enumerate(variants):
        color, ls = f"C{i}", "-" if i < 2 else "--"  # Opacus dashed: it overlays fx_bk
        steps, losses = zip(*v.losses) if v.losses else ((), ())
        if k > 1:
            ax_loss.plot(steps, losses, color=color, alpha=0.2, lw=0.8)
        if len(losses) >= k:
            smooth = [sum(losses[j - k + 1:j + 1]) / k for j in range(k - 1, len(losses))]
            ax_loss.plot(steps[k - 1:], smooth, color=color, ls=ls, label=v.name)
        if v.accountant is not None:
            s, e = zip(*v.eps)
            ax_eps.plot(s, e, color=color, ls=ls, marker=".",
                        label=f"{v.name} (sigma {v.sigma:.3g})")
    ax_loss.axhline(math.log(N_CLASSES), color="gray", lw=0.8, ls=":", label="chance (ln 4)")
    ax_loss.set(xlabel="step", ylabel="training loss (batch mean)",
                title=f"loss ({k}-step moving average)" if k > 1 else "loss")
    ax_eps.set(xlabel="step", ylabel=f"epsilon at delta={args.delta:g}",
               title=f"privacy spent ({args.accountant.upper()} accountant)")
    for ax in (ax_loss, ax_eps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DP-SGD, TinyTransformer, expected batch {args.batch_size}, "
                 f"R={args.max_grad_norm:g}, {args.steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the demo (``argv``: command-line arguments); returns the reported numbers.
    ``--task lm``: the language-model demo, ``fx_bk/demo_lm.py`` (its own arguments)."""
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=("classify", "lm"), default="classify")
    if task.parse_known_args(argv)[0].task == "lm":
        from . import demo_lm

        return demo_lm.main(argv)
    args = parse_args(argv)
    with warnings.catch_warnings():
        # Opacus: its non-secure-RNG notice, and its full backward hooks on a model whose input
        # (token ids) needs no grad (harmless, once per step).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    B, T = args.batch_size, args.seq_len

    x_train, y_train = synthetic_token_task(args.n_train, T, VOCAB, N_CLASSES, seed=args.seed)
    x_test, y_test = synthetic_token_task(args.n_test, T, VOCAB, N_CLASSES, seed=args.seed + 1)
    base = TinyTransformer(vocab=VOCAB, d=args.d_model, n_layers=args.n_layers, max_len=T,
                           n_classes=N_CLASSES)

    # fx_bk's Poisson loader: its batches feed every variant
    if args.user_level and args.compare:
        raise SystemExit("--user-level and --compare: Opacus has no user-level DP to compare")
    loader = DataLoader(TensorDataset(x_train, y_train),
                        batch_size=max(1, B // args.user_level) if args.user_level else B,
                        generator=torch.Generator().manual_seed(args.seed + 2))
    noise_seed = args.seed + 3  # the same noise draws in fx_bk's and Opacus's optimizers
    fx, dp_loader = _fx_bk_variant(copy.deepcopy(base), loader, args, noise_seed)
    variants = [fx]
    if args.compare:
        variants += _compare_variants(base, args, 1 / len(dp_loader), fx.sigma, noise_seed)
    n_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    print(f"TinyTransformer: {n_params} params | n={args.n_train} T={T} expected B={B} "
          f"(Poisson, q={1 / len(dp_loader):.4g}) | R={args.max_grad_norm:g} "
          f"sigma={fx.sigma:.4g} | Adam lr={args.lr:g} | compile={args.compile} | "
          f"threads={torch.get_num_threads()} | {args.steps} steps = "
          f"{args.steps / len(dp_loader):.2f} epochs")
    if args.compare:
        print("--compare: " + ", ".join(v.name for v in variants) + ", one step of each in "
              "turn on the same batches")

    bar = tqdm(total=args.steps, desc=fx.name, unit="step", disable=args.no_progress,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    batches = DynamicBatchLoader(dp_loader) if args.compile else dp_loader
    for step, batch in enumerate(_batches(batches, args.steps), start=1):
        (x, y), mask = batch if args.user_level else (batch, None)
        for v in variants:
            t0 = time.perf_counter()
            loss, logits = v.step(x, y) if mask is None else v.step(x, y, mask)
            loss = loss.item()  # (CPU: already computed; a sync point on GPU)
            v.step_s.append(time.perf_counter() - t0)
            if mask is not None:  # user-level: the real examples of the sampled users
                logits, y, loss = logits[mask], y[mask], loss / max(args.user_level, 1)
            if len(y):  # an empty Poisson batch: nothing to report, the step still happened
                v.losses.append((step, loss))
                w = v.window
                w[0] += loss * len(y)
                w[1] += (logits.argmax(-1) == y).sum().item()
                w[2] += len(y)
        if step % args.log_every == 0 or step == args.steps:
            for v in variants:
                if v.accountant is not None:
                    v.eps.append((step, v.epsilon(args.delta)))
            w = fx.window
            post = {"loss": f"{w[0] / max(w[2], 1):.3f}", "acc": f"{w[1] / max(w[2], 1):.2f}",
                    "eps": f"{fx.eps[-1][1]:.3f}"}
            for v in variants:
                recent = v.step_s[max(args.warmup, step - args.log_every):]
                tag = "ms" if v is fx else f"ms {v.name.split()[0]}"
                post[tag] = f"{1e3 * statistics.median(recent):.0f}" if recent else "-"
                v.window = [0.0, 0, 0]
            bar.set_postfix(post, refresh=False)
        bar.update(1)
    bar.close()
    total = time.perf_counter() - t_start

    with torch.no_grad():
        for v in variants:
            v.model.eval()
            v.test_acc = (v.model(x_test).argmax(-1) == y_test).float().mean().item()
    eps = fx.eps[-1][1]
    print(f"{fx.name}: held-out accuracy {fx.test_acc:.3f} (chance {1 / N_CLASSES:.2f}, "
          f"{args.n_test} samples) | epsilon {eps:.3f} at delta {args.delta:g} "
          f"({args.accountant.upper()}, sigma {fx.sigma:.4g}, {args.steps} steps) | "
          f"median step {fx.median_ms(args.warmup):.1f} ms (first {args.warmup} excluded; "
          f"first step {fx.step_s[0]:.1f} s) | total {total:.1f} s")
    result = {"epsilon": eps, "delta": args.delta, "sigma": fx.sigma, "test_acc": fx.test_acc,
              "median_step_ms": fx.median_ms(args.warmup), "plot": args.plot or None,
              "variants": {}}

    if args.compare:
        np_, gh = variants[1], variants[2]
        print()
        print("| variant | median step ms | first step s | held-out acc | epsilon |")
        print("|---|---:|---:|---:|---:|")
        for v in variants:
            e = f"{v.eps[-1][1]:.3f}" if v.accountant is not None else "-"
            print(f"| {v.name} | {v.median_ms(args.warmup):.1f} | {v.step_s[0]:.1f} "
                  f"| {v.test_acc:.3f} | {e} |")
        r_np = fx.median_ms(args.warmup) / np_.median_ms(args.warmup)
        r_gh = fx.median_ms(args.warmup) / gh.median_ms(args.warmup)
        print()
        print(f"{fx.name} / {np_.name}: {r_np:.2f}x step time")
        print(f"{fx.name} / {gh.name}: {r_gh:.2f}x step time ({1 / r_gh:.2f}x faster)")
        diff = max((a - b).abs().max().item() for a, b in
                   zip(fx.model.parameters(), gh.model.parameters()))
        print(f"{fx.name} vs {gh.name}: same batches and noise, max |parameter difference| "
              f"after {args.steps} steps {diff:.1e}")
        print(f"(medians of steps {args.warmup + 1}..{args.steps}, one step of each variant in "
              f"turn; 2-thread CPU timings move by about 10% between runs)")
        result["ratio_vs_non_private"], result["ratio_vs_opacus_ghost"] = r_np, r_gh
    for v in variants:
        result["variants"][v.name] = {
            "median_step_ms": v.median_ms(args.warmup), "test_acc": v.test_acc,
            "epsilon": v.eps[-1][1] if v.accountant is not None else None}

    if args.audit:
        from .audit import audit

        found = audit(noise_multiplier=fx.sigma, max_grad_norm=args.max_grad_norm,
                      sample_rate=1 / len(dp_loader), steps=args.steps, delta=args.delta,
                      accountant=args.accountant, seed=args.seed)
        print(f"audit: {found.summary()}")
        result["audit_lower_bound"] = found.epsilon_lower_bound
    if args.plot:
        _plot(variants, args.plot, args)
        print(f"plot: {args.plot}")
    return result


if __name__ == "__main__":
    main()
