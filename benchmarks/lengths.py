"""Variable sequence lengths: DP LoRA fine-tuning steps against non-private ones, and what one
symbolic trace costs against a trace per length.

``python -m benchmarks.lengths [--quick] [--rounds N] [--eager]``

Model: a Llama-style ``transformers.LlamaForCausalLM`` from a config (``--d`` wide, ``--layers``
layers, vocabulary ``--vocab``) with PEFT LoRA (rank 8) on every projection; only the adapters
train. Each batch has ``--batch`` sequences of one length drawn uniformly in
``[--min-len, --max-len]`` (padding to the longest of a batch gives that). A step is forward +
per-sample next-token loss (``fx_bk.sequence_cross_entropy``, summed) + backward + SGD step.

1. **Variable lengths**, ``--rounds`` rounds, each on a fresh length, one step of each variant in
   turn (rotating who goes first): non-private compiled (``torch.compile(fullgraph=True)``,
   Dynamo's automatic dynamic shapes) and fx_bk compiled (``fx_bk.transform`` with its default
   ``dynamic``: one symbolic BK trace after the second length). Reported: the median step time of
   each, the ratio fx_bk / non-private per round (median and quartiles), Dynamo compiles and BK
   traces.
2. **Symbolic vs per-length trace** at a few fixed lengths: the symbolic-length program above
   against a program traced for that length alone (``dynamic=False``, compiled for it), steps
   interleaved. A ratio above 1 is what one trace for every length costs at that length (the
   GEMM sites' ghost-or-instantiate choice made per call by ``fx_bk::gemm_norm_by_length``, whose
   clipped sum is always the GEMM).

``--eager`` runs the same without ``torch.compile`` (a quick check of the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fx_bk
from benchmarks.report import machine_info
from benchmarks.variants import ieee_float32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lengths", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--fixed", type=int, nargs="*", default=[16, 64, 256])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--fixed-steps", type=int, default=6)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; explicit values still win
        p.set_defaults(d=64, vocab=256, rounds=8, max_len=128, fixed=[16, 128], fixed_steps=3)
    return p.parse_args(argv)


def lora_llama(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d,
                         intermediate_size=2 * args.d, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(1024, args.max_len), use_cache=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=targets))


class Logits(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def _stepper(module, params, lr: float):
    opt = torch.optim.SGD(params, lr=lr)

    def step(ids):
        opt.zero_grad(set_to_none=True)
        fx_bk.sequence_cross_entropy(module(ids), ids, shift=True).sum().backward()
        opt.step()

    return step


def _timed(step, ids) -> float:
    t0 = time.perf_counter()
    step(ids)
    return time.perf_counter() - t0


def _compile(module, args, counter=None, **kw):
    if args.eager:
        return module
    return torch.compile(module, fullgraph=True, backend=counter or "inductor", **kw)


def _batch(args, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab, (args.batch, t), generator=g).to(args.device)


def variable_lengths(base, args) -> dict:
    plain = copy.deepcopy(base)
    np_counter, bk_counter = CompileCounterWithBackend("inductor"), \
        CompileCounterWithBackend("inductor")
    trainable = [p for p in plain.parameters() if p.requires_grad]
    np_step = _stepper(_compile(plain, args, np_counter), trainable, 1e-3)
    private = copy.deepcopy(base)
    bk = fx_bk.transform(private, max_grad_norm=1.0, loss_reduction="sum")
    bk_step = _stepper(_compile(bk, args, bk_counter),
                       [p for p in private.parameters() if p.requires_grad], 1e-3 / args.batch)
    g = torch.Generator().manual_seed(args.seed)
    first = {}
    for k, t in enumerate((args.min_len, args.max_len)):  # both compiles happen here
        ids = _batch(args, t, seed=10_000 + k)
        first.setdefault("non-private", _timed(np_step, ids))
        first.setdefault("fx_bk", _timed(bk_step, ids))
    times = {"non-private": [], "fx_bk": []}
    ratios, lengths = [], []
    for r in range(args.rounds):
        t = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=g))
        ids = _batch(args, t, seed=r)
        order = [("non-private", np_step), ("fx_bk", bk_step)][:: 1 if r % 2 else -1]
        got = {name: _timed(step, ids) for name, step in order}
        for name, s in got.items():
            times[name].append(s)
        ratios.append(got["fx_bk"] / got["non-private"])
        lengths.append(t)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"lengths": lengths, "first_step_s": first,
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "ratio": {"median": statistics.median(ratios), "p25": q[0], "p75": q[2]},
            "compiles": {"non-private": np_counter.frame_count, "fx_bk": bk_counter.frame_count},
            "bk_traces": len(bk.programs), "bk_module": bk}


def fixed_lengths(base, args, symbolic_bk) -> list[dict]:
    """The symbolic program (already built) against one traced for each length alone."""
    rows = []
    for t in args.fixed:
        static_model = copy.deepcopy(base)
        static = fx_bk.transform(static_model, max_grad_norm=1.0, loss_reduction="sum",
                                 dynamic=False)
        st_step = _stepper(_compile(static, args, dynamic=False),
                           [p for p in static_model.parameters() if p.requires_grad], 0.0)
        dy_step = _stepper(_compile(symbolic_bk, args),
                           [p for p in symbolic_bk.parameters() if p.requires_grad], 0.0)
        ids = _batch(args, t, seed=t)
        st_step(ids)
        dy_step(ids)  # warm
        st, dy = [], []
        for k in range(args.fixed_steps):
            for name, step in ([("static", st_step), ("symbolic", dy_step)][:: 1 if k % 2
                                                                             else -1]):
                (st if name == "static" else dy).append(_timed(step, ids))
        rows.append({"length": t, "static_ms": 1e3 * statistics.median(st),
                     "symbolic_ms": 1e3 * statistics.median(dy),
                     "ratio": statistics.median(dy) / statistics.median(st)})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ieee_float32(args.device)
    base = Logits(lora_llama(args)).to(args.device)
    n_lora = sum(p.numel() for p in base.parameters() if p.requires_grad)
    mode = "eager" if args.eager else "compiled"
    print(f"Llama-style d={args.d} layers={args.layers} vocab={args.vocab} + LoRA r=8 "
          f"({n_lora:,} trainable) | B={args.batch}, lengths uniform in "
          f"[{args.min_len}, {args.max_len}] | {mode} | {args.threads} threads", flush=True)
    var = variable_lengths(base, args)
    bk = var.pop("bk_module")
    print(f"\n| variable lengths ({args.rounds} rounds) | median step ms | first steps s |")
    print("|---|---:|---:|")
    for name in ("non-private", "fx_bk"):
        print(f"| {name} {mode} | {var['median_ms'][name]:.1f} | "
              f"{var['first_step_s'][name]:.1f} |")
    r = var["ratio"]
    print(f"\nfx_bk / non-private: {r['median']:.2f}x (p25 {r['p25']:.2f}, p75 {r['p75']:.2f}) "
          f"| Dynamo compiles: non-private {var['compiles']['non-private']}, fx_bk "
          f"{var['compiles']['fx_bk']} | BK traces {var['bk_traces']}")
    rows = fixed_lengths(base, args, bk) if args.fixed else []
    if rows:
        print("\n| length | per-length trace ms | symbolic trace ms | symbolic / per-length |")
        print("|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['length']} | {row['static_ms']:.1f} | {row['symbolic_ms']:.1f} | "
                  f"{row['ratio']:.2f} |")
    result = {"machine": machine_info(args), "config": vars(args), "variable": var,
              "fixed": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
