"""Small model builders and a synthetic task shared by the demo, the benchmarks and the tests.

Every model here uses only ops fx_bk supports on trainable parameters: embedding, layer_norm,
linear, plus parameter-free ops (scaled_dot_product_attention, elementwise, views). No dropout,
no BatchNorm, no nn.MultiheadAttention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        assert d % n_heads == 0, "d must be divisible by n_heads"
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape  # [B, T, d]
        H = self.n_heads
        qkv = self.qkv(self.ln1(x))  # [B, T, 3d]
        # The batch stays at dim 0 in every intermediate (no [3, B, ...] stacking).
        q, k, v = qkv.view(B, T, 3, H, d // H).unbind(2)  # [B, T, H, dh] each
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, dh]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, dh]
        a = a.transpose(1, 2).reshape(B, T, d)  # [B, T, d]
        x = x + self.proj(a)  # [B, T, d]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))  # [B, T, d]
        return x


class TinyTransformer(nn.Module):
    """Causal pre-LN transformer classifier: tokens [B, T] (int64) -> logits [B, n_classes]."""

    def __init__(
        self,
        vocab: int = 64,
        d: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        max_len: int = 32,
        n_classes: int = 4,
        padding_idx: int | None = 0,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape  # x: [B, T]
        # [B, T]: one lookup per sample, so the positional embedding's per-sample gradient is
        # visible at the op (fx_bk rejects a [T, d] lookup broadcast over the batch). Contiguous
        # because Opacus's embedding ghost norm calls indices.view(-1, 1).
        pos = torch.arange(T, device=x.device).expand(B, T).contiguous()  # [B, T]
        h = self.tok(x) + self.pos(pos)  # [B, T, d]
        for block in self.blocks:
            h = block(h)  # [B, T, d]
        h = self.ln_f(h).mean(dim=1)  # [B, d]
        return self.head(h)  # [B, n_classes]


def mlp(d_in: int, hidden: int, depth: int, n_classes: int) -> nn.Sequential:
    """``depth`` hidden Linear+ReLU layers of width ``hidden``, then a Linear head."""
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def synthetic_token_task(
    n: int, T: int, vocab: int, n_classes: int, seed: int = 0, skew: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences labelled by a learnable bag-of-tokens rule.

    Tokens lie in ``1..vocab-1`` (0 is padding); token ``v`` belongs to group ``v % n_classes``.
    The label is the most frequent group in the sequence (ties broken at random, fixed by
    ``seed``): mean-pooled one-hot group embeddings followed by an argmax solve it exactly. To give
    clear margins, each sequence first picks a group uniformly and draws each token from it with
    probability ``skew`` (otherwise uniformly); ``skew=0`` gives i.i.d. uniform tokens.
    Returns ``x`` [n, T] int64 and ``y`` [n] int64, classes roughly balanced.
    """
    assert vocab > n_classes, "every group needs a non-padding token: vocab > n_classes"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, T), generator=g)  # [n, T] uniform tokens
    # Tokens of group c: c, c + n_classes, ... (token 0 excluded), remapped from a uniform draw.
    group = torch.randint(0, n_classes, (n, 1), generator=g)  # [n, 1]
    n_in_group = (vocab - 1 - group) // n_classes + (group > 0).long()  # [n, 1]; > 0 if vocab > C
    first = torch.where(group > 0, group, group + n_classes)  # [n, 1] smallest token of the group
    j = (torch.rand(n, T, generator=g) * n_in_group).long()  # [n, T] index inside the group
    skewed = first + n_classes * j  # [n, T] tokens of the picked group
    x = torch.where(torch.rand(n, T, generator=g) < skew, skewed, x)  # [n, T]
    hist = F.one_hot(x % n_classes, n_classes).sum(dim=1).float()  # [n, n_classes]
    jitter = 0.5 * torch.rand(n, n_classes, generator=g)  # < 1: only breaks ties
    y = (hist + jitter).argmax(dim=1)  # [n]
    return x, y


def markov_chain(vocab: int, seed: int, branching: int = 3) -> torch.Tensor:
    """A random first-order Markov chain over tokens ``1..vocab-1`` (0 is padding) in which
    each token is followed by one of ``branching`` likely successors: ``[vocab, vocab]``
    transition probabilities (row 0 unused). Its entropy rate is far below ``log(vocab - 1)``,
    so a language model has structure to learn."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((vocab, vocab), -4.0)
    logits[:, 0] = -float("inf")  # never emit padding
    for v in range(vocab):
        nxt = 1 + torch.randperm(vocab - 1, generator=g)[:branching]
        logits[v, nxt] = torch.linspace(2.0, 0.0, branching)
    return logits.softmax(-1)


def perturbed_chain(chain: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``chain`` with the successors of a ``fraction`` of the tokens drawn anew: a related
    distribution (the "private" text a model pretrained on ``chain`` is fine-tuned on)."""
    other = markov_chain(chain.shape[0], seed)
    g = torch.Generator().manual_seed(seed)
    changed = torch.rand(chain.shape[0], generator=g) < fraction
    return torch.where(changed.unsqueeze(1), other, chain)


def markov_sequences(chain: torch.Tensor, n: int, min_len: int, max_len: int,
                     seed: int) -> list[torch.Tensor]:
    """``n`` token sequences drawn from ``chain``, lengths uniform in ``[min_len, max_len]``."""
    g = torch.Generator().manual_seed(seed)
    vocab = chain.shape[0]
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    tokens = torch.empty(n, max_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(1, vocab, (n,), generator=g)
    for t in range(1, max_len):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=g).squeeze(1)
    return [tokens[i, : lengths[i]] for i in range(n)]


def entropy_rate(chain: torch.Tensor) -> float:
    """The chain's entropy per token (nats) under its stationary distribution: the lowest
    mean next-token loss a model can reach; ``exp`` of it is the floor of the perplexity."""
    p = torch.full((chain.shape[0],), 1.0 / (chain.shape[0] - 1))
    p[0] = 0
    for _ in range(200):
        p = p @ chain
    rows = -(chain * chain.clamp_min(1e-30).log()).sum(1)
    return float((p * rows).sum())
