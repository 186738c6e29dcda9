"""DP-SGD on a tiny transformer with fx_bk: ``python -m fx_bk.demo``.

Each step: one forward through ``fx_bk.transform(model, max_grad_norm=R)`` (optionally under
``torch.compile(fullgraph=True)``), a mean cross-entropy loss and one backward, which leaves the
clipped sum ``sum_i C_i grad_i`` in every ``p.grad``; then Gaussian noise ``N(0, (sigma R)^2)``
is added to each ``p.grad``, the sum is divided by the batch size, and the optimizer steps.

The task is synthetic (``fx_bk.models.synthetic_token_task``): no data or weights are downloaded.
Batches are drawn uniformly without replacement at a fixed size (not Poisson sampling), and there
is no privacy accountant here: the demo reports no (epsilon, delta). Accounting comes later.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fx_bk
from fx_bk.models import TinyTransformer, synthetic_token_task

VOCAB, N_CLASSES = 64, 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound R")
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="sigma")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile(fullgraph=True) the fx_bk module (default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--n-test", type=int, default=1024)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    B, T, R, sigma = args.batch_size, args.seq_len, args.max_grad_norm, args.noise_multiplier

    x_train, y_train = synthetic_token_task(args.n_train, T, VOCAB, N_CLASSES, seed=args.seed)
    x_test, y_test = synthetic_token_task(args.n_test, T, VOCAB, N_CLASSES, seed=args.seed + 1)

    model = TinyTransformer(vocab=VOCAB, max_len=T, n_classes=N_CLASSES)
    bk = fx_bk.transform(model, max_grad_norm=R)  # shares model's parameters
    if args.compile:
        bk = torch.compile(bk, fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    n_params = sum(p.numel() for p in params)
    print(f"TinyTransformer: {n_params} params | B={B} T={T} R={R} sigma={sigma} "
          f"lr={args.lr} compile={args.compile} threads={torch.get_num_threads()}")

    t_start = time.perf_counter()
    recent: list[float] = []  # step times (s) since the last log line, step 0 excluded
    first_step_s = float("nan")
    order = torch.randperm(args.n_train)
    pos = 0
    for step in range(args.steps):
        if pos + B > args.n_train:
            order, pos = torch.randperm(args.n_train), 0
        idx = order[pos:pos + B]
        pos += B
        x, y = x_train[idx], y_train[idx]  # [B, T], [B]

        t0 = time.perf_counter()
        logits = bk(x)  # [B, n_classes]
        loss = F.cross_entropy(logits, y)
        loss.backward()  # p.grad = sum_i C_i grad_i (clipped sum, not divided by B)
        with torch.no_grad():
            for p in params:
                p.grad.add_(torch.randn_like(p.grad), alpha=sigma * R).div_(B)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0

        if step == 0:
            first_step_s = dt
        else:
            recent.append(dt)
        if step % args.log_every == 0 or step == args.steps - 1:
            acc = (logits.argmax(-1) == y).float().mean().item()
            ms = f"{1e3 * statistics.median(recent):7.1f} ms" if recent else "      -   "
            first = "first step incl. compile" if args.compile else "first step incl. tracing"
            extra = f"  ({first}: {first_step_s:.1f} s)" if step == 0 else ""
            print(f"step {step:4d}  loss {loss.item():.4f}  batch acc {acc:5.2f}  "
                  f"step {ms}{extra}")
            recent = []

    with torch.no_grad():
        test_acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    total = time.perf_counter() - t_start
    print(f"held-out accuracy {test_acc:.3f} (chance {1 / N_CLASSES:.2f}) on {args.n_test} "
          f"samples | total {total:.1f} s (first step {first_step_s:.1f} s)")
    print("no privacy accountant: (epsilon, delta) not computed")


if __name__ == "__main__":
    main()
