"""Per-sample losses for sequence models, the shape DP-SGD needs.

A language-model loss that averages over all ``B*T`` tokens of a batch (what Hugging Face
computes from ``labels=``) divides by the number of labelled tokens *in the batch*: when
padding (``ignore_index``) differs between samples, one sample's padding changes every other
sample's weight, and the per-sample gradients are no longer per-sample. Compute one loss per
sample instead (its mean over its own labelled tokens) and reduce that over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._torch_internals import keep_in_forward
from .errors import Problem, UnsupportedModelError


def sequence_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
) -> torch.Tensor:
    """Per-sample token-mean cross entropy: ``[B]``.

    ``logits``: ``[B, T, V]``; ``labels``: ``[B, T]`` with ``ignore_index`` on unlabelled tokens.
    ``shift=True`` predicts token ``t+1`` from position ``t`` (causal LM, like Hugging Face's
    ``labels=input_ids``). A sample without labelled tokens gets loss 0.

        loss = fx_bk.sequence_cross_entropy(model(ids).logits, labels, shift=True).mean()
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"fx_bk.sequence_cross_entropy: expected logits [B, T, V] and labels [B, T], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=ignore_index, reduction="none"
    )  # [B, T], 0 where ignored
    counted = (labels != ignore_index).sum(1).clamp(min=1)
    return tokens.sum(1) / counted.to(tokens.dtype)


@torch.library.custom_op("fx_bk::check_labelled_mean", mutates_args=())
def check_labelled_mean(target: torch.Tensor, ignore_index: int, outer: int,
                        fold: int, batch: int) -> torch.Tensor:
    """Run by the forward graph next to a loss that is a mean over labelled entries (labels not
    ``ignore_index``): such a mean is the mean of per-sample means only when every sample has
    as many labelled entries; otherwise its divisor couples the samples, and this raises before
    any gradient exists. Dim 0 of ``target`` is ``outer * batch * fold``: ``[B*T]`` targets
    have ``fold = T``, ``[T*B]`` ones ``outer = T``; -1 for one of them: the rest (a dynamic
    length)."""
    labelled = (target != ignore_index).reshape(target.shape[0], -1)
    counts = labelled.unflatten(0, (outer, batch, fold)).sum((0, 2, 3))
    if counts.numel() and bool((counts != counts[0]).any()):
        raise UnsupportedModelError([Problem(
            "loss-not-per-sample",
            f"the model's loss is a mean over the labels that are not ignore_index="
            f"{ignore_index}, and the samples of this batch have different numbers of them "
            f"({counts.tolist()}): its divisor, the batch's count of labels, couples the "
            f"samples. Return logits and compute a per-sample loss outside the model "
            f"(fx_bk.sequence_cross_entropy(logits, labels).mean())",
        )])
    return torch.zeros((), dtype=torch.int64, device=target.device)


@check_labelled_mean.register_fake
def _check_labelled_mean_fake(target: torch.Tensor, ignore_index: int, outer: int, fold: int,
                              batch: int):
    return torch.empty((), dtype=torch.int64, device=target.device)


# a side effect: dead-code elimination keeps it although nothing reads its output
keep_in_forward(torch.ops.fx_bk.check_labelled_mean.default)
