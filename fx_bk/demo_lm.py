"""DP fine-tuning of a language model with LoRA through the Hugging Face ``Trainer``:
``python -m fx_bk.demo --task lm``.

A tiny Llama-style model, built from a config (random weights, nothing downloaded), is first
trained without privacy on "public" text drawn from a Markov chain (it stands for the
pretrained model), then fine-tuned with DP-SGD on "private" text from a related chain (the
successors of ``--changed`` of the tokens differ), through
``fx_bk.integrations.transformers.DPTrainer`` and PEFT LoRA adapters (only they are trained,
clipped and noised). Sequences have lengths drawn uniformly in ``[--min-len, --max-len]`` and
are padded to the longest of each batch, so the length changes at almost every step: one
symbolic BK trace serves every length (``fx_bk.transform``'s ``dynamic``). At the end:
perplexity of held-out private text before and after (and the chain's floor, ``exp`` of its
entropy rate), epsilon at ``--delta``, the number of BK traces, and a PNG of loss and epsilon.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from fx_bk.models import entropy_rate, markov_chain, markov_sequences, perturbed_chain


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fx_bk.demo --task lm", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=("lm",), default="lm")
    p.add_argument("--steps", type=int, default=120, help="DP optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--n-train", type=int, default=4096, help="private training sequences")
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--vocab", type=int, default=48)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--changed", type=float, default=0.5,
                   help="fraction of tokens whose successors differ in the private text")
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="non-private steps on the public chain before fine-tuning")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the adapters")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound R")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile(fullgraph=True) the fx_bk module")
    p.add_argument("--plot", default="demo_dp_lm.png", help="PNG path ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i], "labels": self.seqs[i]}


def pad_batch(items) -> dict:
    """Pad to the longest sequence of the batch: ``input_ids`` with 0, ``labels`` with -100."""
    longest = max((len(it["input_ids"]) for it in items), default=1)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), -100, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"], it["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=2 * args.d_model,
        num_hidden_layers=args.n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(64, args.max_len), use_cache=False, pad_token_id=0,
        tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model, seqs, batch: int = 64) -> float:
    """``exp`` of the mean next-token loss over every token of ``seqs``."""
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(seqs), batch):
        b = pad_batch([{"input_ids": s, "labels": s} for s in seqs[k : k + batch]])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                               ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + int((labels != -100).sum())
    model.train()
    return math.exp(total / count)


def pretrain(model, seqs, steps: int, seed: int) -> None:
    """Non-private training on public text (it stands for a pretrained checkpoint)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(seqs), (64,), generator=g).tolist()
        b = pad_batch([{"input_ids": seqs[i], "labels": seqs[i]} for i in idx])
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                               ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv=None) -> dict:
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return _run(args)


def _run(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from fx_bk.integrations.transformers import DPTrainer

    torch.set_num_threads(2)
    public = markov_chain(args.vocab, args.seed)
    private = perturbed_chain(public, args.changed, seed=args.seed + 1)
    lens = (args.min_len, args.max_len)
    train = markov_sequences(private, args.n_train, *lens, seed=args.seed + 2)
    test = markov_sequences(private, args.n_test, *lens, seed=args.seed + 3)
    floor = math.exp(entropy_rate(private))

    t0 = time.perf_counter()
    base = build_model(args)
    pretrain(base, markov_sequences(public, 4096, *lens, seed=args.seed + 4),
             args.pretrain_steps, args.seed)
    before = perplexity(base, test)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head"]
    model = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                            target_modules=targets, lora_dropout=0.0))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama {n_all - n_lora} params, pretrained {args.pretrain_steps} steps on public "
          f"text in {time.perf_counter() - t0:.1f} s | LoRA r={args.lora_r}: {n_lora} trainable "
          f"| private text: n={args.n_train}, lengths {args.min_len}..{args.max_len}, padded "
          f"per batch | expected batch {args.batch_size} | R={args.max_grad_norm:g} | "
          f"target epsilon {args.target_epsilon:g} at delta {args.delta:g} | "
          f"compile={args.compile}")

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=0.0,
            logging_steps=max(1, args.steps // 20), save_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=args.no_progress, remove_unused_columns=False,
            seed=args.seed)
        trainer = DPTrainer(
            model=model, args=targs, train_dataset=_Sequences(train), data_collator=pad_batch,
            max_grad_norm=args.max_grad_norm, target_epsilon=args.target_epsilon,
            target_delta=args.delta, compile=args.compile, dp_seed=args.seed)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    after = perplexity(model, test)
    eps = trainer.get_epsilon()
    traces = len(trainer.dp_module.programs)
    print(f"perplexity of held-out private text: {before:.2f} before, {after:.2f} after DP "
          f"fine-tuning (floor {floor:.2f}) | epsilon {eps:.3f} at delta {args.delta:g} "
          f"(sigma {trainer.noise_multiplier:.3g}, {args.steps} steps) | {traces} BK "
          f"trace(s) for every length | fine-tuning {seconds:.1f} s")
    history = [h for h in trainer.state.log_history if "loss" in h and "epsilon" in h]
    if args.plot:
        _plot(history, args.plot)
        print(f"plot: {args.plot}")
    return {"perplexity_before": before, "perplexity_after": after, "floor": floor,
            "epsilon": eps, "sigma": trainer.noise_multiplier, "traces": traces,
            "history": history}


def _plot(history, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["loss"] for h in history])
    ax1.set(xlabel="step", ylabel="training loss (per-sample mean)", title="DP LoRA fine-tuning")
    ax2.plot(steps, [h["epsilon"] for h in history])
    ax2.set(xlabel="step", ylabel="epsilon", title="privacy spent")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
