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
