"""The models of ``benchmarks.step``: builders, batches and the per-sample loss of each.

Every model maps a batch ``x`` to outputs whose loss is ``per_sample_loss(out, y)`` ([B], one
number per sample: a cross entropy in float32, for the language model the mean over next-token
positions); a training step minimises the batch mean of it. ``logits_targets`` gives the
flattened ``(logits [N, C], targets [N], shape)`` Opacus's ghost-clipping loss wrapper needs
(``shape`` is ``(B, positions)`` for the language model, else None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fx_bk.models import TinyTransformer, mlp, synthetic_token_task


@dataclass
class BenchModel:
    name: str  # key for --models
    size: dict[str, Any]  # shape parameters, shown in the table
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # seed -> (x, y)
    logits_targets: Callable[[Any, torch.Tensor], tuple] = field(default=None)

    @property
    def batch_size(self) -> int:
        return self.size["B"]

    def per_sample_loss(self, out, y) -> torch.Tensor:
        logits, targets, shape = self.logits_targets(out, y)
        # float32 (a no-op unless the forward ran under bf16 autocast: AMP's loss in float32)
        loss = F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
        return loss if shape is None else loss.view(shape).mean(1)  # [B]

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.size.items())


def _classification(out, y):
    return out, y, None


# ----------------------------------------------------------------------------- MLP


def mlp_model(B=64, d_in=1024, hidden=1024, depth=4, classes=10) -> BenchModel:
    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(B, d_in, generator=g), torch.randint(0, classes, (B,), generator=g)

    return BenchModel("mlp", dict(B=B, d_in=d_in, hidden=hidden, depth=depth, classes=classes),
                      lambda: mlp(d_in, hidden, depth, classes), batch, _classification)


# ----------------------------------------------------------------------------- encoder


def encoder_model(B=32, T=128, d=256, heads=4, layers=4, vocab=512, classes=4,
                  name="encoder") -> BenchModel:
    """``fx_bk.models.TinyTransformer``: pre-LN blocks (causal SDPA), mean pool, linear head."""

    def build():
        return TinyTransformer(vocab=vocab, d=d, n_heads=heads, n_layers=layers, max_len=T,
                               n_classes=classes)

    def batch(seed):
        return synthetic_token_task(B, T, vocab, classes, seed=seed)

    return BenchModel(name, dict(B=B, T=T, d=d, heads=heads, layers=layers, vocab=vocab),
                      build, batch, _classification)


# ----------------------------------------------------------------------------- GPT-2


def gpt2_model(B=16, T=128, d=768, heads=12, layers=2, vocab=8192, name="gpt2") -> BenchModel:
    """``transformers.GPT2LMHeadModel`` from a config (tied ``wte``/``lm_head``, no dropout);
    loss: next-token cross entropy, mean over positions per sample."""

    def build():
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(
            n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=T,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
        )
        model = transformers.GPT2LMHeadModel(cfg)
        assert model.lm_head.weight is model.transformer.wte.weight  # tied
        return model

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, vocab, (B, T), generator=g)
        return x, x[:, 1:].contiguous()  # next-token targets [B, T-1]

    def logits_targets(out, y):
        logits = out.logits[:, :-1]  # [B, T-1, V]
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1), tuple(y.shape)

    return BenchModel(name, dict(B=B, T=T, d=d, heads=heads, layers=layers, vocab=vocab),
                      build, batch, logits_targets)


# ----------------------------------------------------------------------------- CNN


class _GNBlock(nn.Module):
    """conv-GN-ReLU-conv-GN + shortcut (1x1 conv when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.short = (nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
                      if stride != 1 or c_in != c_out else None)
        self.relu = nn.ReLU()  # not in-place: Opacus's hooks fail on in-place ops after a layer

    def forward(self, x):  # [B, c_in, H, W] -> [B, c_out, H/stride, W/stride]
        h = self.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        return self.relu(h + (x if self.short is None else self.short(x)))


class ResNetGN(nn.Module):
    """ResNet-style CNN for 32x32 images with GroupNorm: stem, one residual block per stage
    (widths ``w, 2w, 4w, ...``, stride 2 between stages), global average pool, linear head."""

    def __init__(self, width: int = 32, classes: int = 10, groups: int = 8, stages: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, width)
        self.relu = nn.ReLU()
        widths = [width * 2**i for i in range(stages)]
        self.stages = nn.Sequential(*(
            _GNBlock(widths[max(i - 1, 0)], w, 1 if i == 0 else 2, groups)
            for i, w in enumerate(widths)))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):  # [B, 3, H, W]
        h = self.stages(self.relu(self.gn(self.stem(x))))  # [B, w * 2^(stages-1), H', W']
        return self.head(h.mean((2, 3)))  # [B, classes]


def cnn_model(B=64, width=32, stages=3, image=32, classes=10) -> BenchModel:
    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(B, 3, image, image, generator=g),
                torch.randint(0, classes, (B,), generator=g))

    return BenchModel("cnn", dict(B=B, width=width, stages=stages, image=image, classes=classes),
                      lambda: ResNetGN(width, classes, stages=stages), batch, _classification)


# ----------------------------------------------------------------------------- sets

MODEL_NAMES = ("mlp", "encoder", "gpt2", "cnn")
LONG_NAMES = ("encoder_T1024", "gpt2_V50257")


def bench_models(quick: bool, long: bool, vocab: int | None = None,
                 batch: int | None = None) -> dict[str, BenchModel]:
    """Every benchmark model by name (``--long`` adds the long-sequence / large-vocab rows).
    ``vocab`` overrides the GPT-2 vocabulary, ``batch`` every model's batch size."""
    kw = {} if batch is None else {"B": batch}
    if quick:
        models = [
            mlp_model(**{"B": 32, **kw}, d_in=256, hidden=256, depth=4),
            encoder_model(**{"B": 16, **kw}, T=64, d=128, heads=4, layers=1),
            gpt2_model(**{"B": 8, **kw}, T=64, d=128, heads=4, layers=1,
                       vocab=vocab or 2048),
            cnn_model(**{"B": 16, **kw}, width=16, stages=2),
        ]
    else:
        models = [mlp_model(**kw), encoder_model(**kw), gpt2_model(**kw, vocab=vocab or 8192),
                  cnn_model(**kw)]
        if long:
            models += [encoder_model(**{"B": 8, **kw}, T=1024, name="encoder_T1024"),
                       gpt2_model(**kw, vocab=50257, name="gpt2_V50257")]
    return {m.name: m for m in models}
