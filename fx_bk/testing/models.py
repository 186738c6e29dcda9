"""Small reference models of the oracle tests and `benchmarks/oracle_errors.py` (Opacus-free,
torchvision-free): one per rule family and sharing pattern, each with a batch maker."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d=12, h=16, classes=5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.Tanh(),
                                 nn.Linear(h, classes))

    def forward(self, x):  # [B, d] -> [B, classes]
        return self.net(x)


class TransformerStyle(nn.Module):
    """Embedding (padding_idx) + LayerNorm + Linear on [B, T, d] + causal SDPA + head."""

    def __init__(self, vocab=13, d=16, heads=2, classes=5, padding_idx=0):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # [B, T] token ids
        h = self.emb(x)  # [B, T, d]
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)  # [B, T, d] each
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, dh]
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))  # [B, classes]


class Linear4D(nn.Module):
    """Linear applied to a [B, C, H, W] input (positions fold into T)."""

    def __init__(self, w=6, classes=5):
        super().__init__()
        self.fc = nn.Linear(w, 8)
        self.ln = nn.LayerNorm([3, 4, 8])
        self.head = nn.Linear(8, classes)

    def forward(self, x):  # [B, 3, 4, w]
        h = torch.relu(self.ln(self.fc(x)))  # [B, 3, 4, 8]
        return self.head(h.mean((1, 2)))


class ReusedLinear(nn.Module):
    """The same Linear called twice: one parameter, two sites, cross terms in the norm."""

    def __init__(self, d=10, classes=5):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # [B, d]
        h = torch.tanh(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h)


class PartlyFrozen(nn.Module):
    """Frozen embedding, frozen LayerNorm weight (bias trainable), frozen Linear bias."""

    def __init__(self, vocab=11, d=12, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)
        self.emb.weight.requires_grad_(False)
        self.ln.weight.requires_grad_(False)
        self.fc.bias.requires_grad_(False)

    def forward(self, x):  # [B, T]
        h = torch.relu(self.fc(self.ln(self.emb(x))))  # [B, T, d]
        return self.head(h.sum(1))


class ResNetGN(nn.Module):
    """Torchvision-free ResNet-style CNN: conv stem, one residual block with GroupNorm and
    in-place ReLU, a strided depthwise-separable stage, global average pool, linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn0 = nn.GroupNorm(2, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding="same")
        self.down = nn.Conv2d(8, 8, 3, stride=2, groups=8)  # depthwise
        self.point = nn.Conv2d(8, 12, 1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(12, classes)

    def forward(self, x):  # [B, 3, 8, 8]
        h = self.relu(self.gn0(self.stem(x)))  # [B, 8, 8, 8]
        r = self.conv2(self.relu(self.gn1(self.conv1(h))))
        h = self.relu(h + r)
        h = self.relu(self.point(self.down(h)))  # [B, 12, 3, 3]
        return self.head(h.mean((2, 3)))


def batch_for(name: str, model: nn.Module, b: int, seed: int, dtype=torch.float32,
              padding: bool = True):
    """Inputs and labels for ``model`` with batch size ``b``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (b,), generator=g)
    if name == "mlp":
        return torch.randn(b, 12, generator=g, dtype=dtype), y
    if name == "linear4d":
        return torch.randn(b, 3, 4, 6, generator=g, dtype=dtype), y
    if name == "reused":
        return torch.randn(b, 10, generator=g, dtype=dtype), y
    if name == "resnet_gn":
        return torch.randn(b, 3, 8, 8, generator=g, dtype=dtype), y
    x = torch.randint(1, model.emb.num_embeddings, (b, 7), generator=g)
    if padding and name == "transformer":
        x[: (b + 1) // 2, -2:] = 0  # padding tokens at the end of half the samples
    return x, y


MODELS = {
    "mlp": MLP,
    "transformer": TransformerStyle,
    "linear4d": Linear4D,
    "reused": ReusedLinear,
    "partly_frozen": PartlyFrozen,
    "resnet_gn": ResNetGN,
}
# models Opacus 1.6 ghost clipping computes correctly (Linear on 4-D input, a reused Linear and
# ReLU(inplace=True) after a hooked layer are not among them; see DESIGN.md)
OPACUS_MODELS = ("mlp", "transformer", "partly_frozen")
