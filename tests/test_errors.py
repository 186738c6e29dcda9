"""Bad input: a clear error before the first step, never a silent wrong gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fx_bk
from fx_bk.errors import ConfigError, UnsupportedModelError
from fx_bk.testing import assert_matches_per_sample


def _model():
    return nn.Sequential(nn.Linear(4, 3))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", None, True])
def test_max_grad_norm_must_be_positive(bad):
    with pytest.raises(ConfigError, match="max_grad_norm"):
        fx_bk.transform(_model(), max_grad_norm=bad)


def test_unknown_loss_reduction():
    with pytest.raises(ConfigError, match="loss_reduction.*'avg'"):
        fx_bk.transform(_model(), max_grad_norm=1.0, loss_reduction="avg")


def test_max_grad_norm_is_keyword_only_and_required():
    with pytest.raises(TypeError):
        fx_bk.transform(_model(), 1.0)
    with pytest.raises(TypeError):
        fx_bk.transform(_model())


def test_no_trainable_parameters():
    m = _model().requires_grad_(False)
    with pytest.raises(UnsupportedModelError, match="no parameter with requires_grad=True"):
        fx_bk.transform(m, max_grad_norm=1.0)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_rejected_even_frozen_or_eval(affine):
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=affine), nn.Linear(3, 2))
    m.eval()
    for p in m[1].parameters():
        p.requires_grad_(False)
    with pytest.raises(UnsupportedModelError, match=r"module '1' is BatchNorm1d.*GroupNorm"):
        fx_bk.transform(m, max_grad_norm=1.0)


class Centered(nn.Module):
    """Subtracts the batch mean: sample i's output depends on every sample."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - h.mean(0, keepdim=True)


class WeaklyCoupled(nn.Module):
    """A batch statistic with a small weight: a large batch and a 1% share still move every
    sample far above the check's rounding tolerance (1e-4 of the largest value in float32)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x + 0.01 * x.mean(0, keepdim=True))


class MixesBeforeSite(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.softmax(x, dim=0))


class MixesTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.emb(x)  # [B, T, d]
        return self.fc(h.sum(0, keepdim=True).expand_as(h).contiguous()).mean(1)


@pytest.mark.parametrize(
    "model, x, op",
    [
        (Centered(), torch.randn(5, 4), "aten.mean"),
        (MixesBeforeSite(), torch.randn(5, 4), "aten.softmax"),
        (WeaklyCoupled(), torch.randn(64, 4), "aten.mean"),
        (MixesTokens(), torch.randint(0, 10, (5, 6)), "aten.sum"),
    ],
    ids=["sub-batch-mean", "softmax-dim0", "weak-batch-mean-B64", "int-inputs"],
)
def test_mixing_samples_is_detected(model, x, op):
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    with pytest.raises(UnsupportedModelError, match=rf"mixes-samples.*op {op}.*test_errors.py"):
        bk(x)
    assert all(p.grad is None for p in model.parameters())


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.ConvTranspose1d(2, 3, 3)
        self.emb = nn.EmbeddingBag(10, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = self.conv(x).mean(-1) + self.emb(x[:, 0, :4].long().abs() % 10)
        return self.fc(h)


def test_unsupported_ops_named_and_collected():
    """Ops without a rule that the vmap(vjp) fallback cannot take either (embedding_bag has
    several outputs) are reported together, with module, parameter and what to do."""
    bk = fx_bk.transform(Unsupported(), max_grad_norm=1.0)
    with pytest.raises(UnsupportedModelError) as info:
        bk(torch.randn(4, 2, 8))
    msg = str(info.value)
    problems = [p for p in info.value.problems if "embedding_bag" in p.message]
    assert len(problems) == 1, msg
    assert "'emb.weight'" in msg and "module 'emb'" in msg
    assert "Supported ops: broadcast_add, broadcast_mul, conv" in msg and "vmap(vjp)" in msg
    assert "requires_grad=False" in msg


def test_all_problems_raised_once():
    class Both(Unsupported):
        def forward(self, x):
            h = self.emb(x[:, 0, :4].long().abs() % 10)
            return self.fc(h - h.mean(0))

    with pytest.raises(UnsupportedModelError) as info:
        fx_bk.transform(Both(), max_grad_norm=1.0)(torch.randn(4, 2, 8))
    kinds = [p.kind for p in info.value.problems]
    assert kinds.count("unsupported-op") == 1 and kinds.count("mixes-samples") == 1, kinds


def test_frozen_unsupported_op_is_fine():
    m = Unsupported()
    m.conv.requires_grad_(False)
    m.emb.requires_grad_(False)
    bk = fx_bk.transform(m, max_grad_norm=1.0)
    bk(torch.randn(4, 2, 8)).sum().backward()
    assert m.fc.weight.grad is not None and m.emb.weight.grad is None


@pytest.mark.parametrize(
    "emb, reason",
    [
        (nn.Embedding(10, 4, sparse=True), "sparse=True"),
        (nn.Embedding(10, 4, scale_grad_by_freq=True), "scale_grad_by_freq=True"),
        # max_norm renormalizes the weight in place, under no_grad, from the batch's tokens
        (nn.Embedding(10, 4, max_norm=1.0),
         r"updates parameter '0\.weight' in place(.|\n)*aten\.detach.*'0\.weight'.*written in "
         r"place with batched data"),
    ],
)
def test_embedding_options_rejected(emb, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        fx_bk.transform(nn.Sequential(emb), max_grad_norm=1.0)(torch.randint(0, 10, (3, 5)))


def test_input_requiring_grad_rejected():
    bk = fx_bk.transform(_model(), max_grad_norm=1.0)
    with pytest.raises(fx_bk.FxBkError, match="input of the model requires grad"):
        bk(torch.randn(3, 4, requires_grad=True))


def test_batch_size_specialization_rejected():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.view(5, 4))

    with pytest.raises(UnsupportedModelError, match="only works for batch size 5"):
        fx_bk.transform(Fixed(), max_grad_norm=1.0)(torch.randn(5, 4))


def test_forward_branching_on_batch_size_gets_one_program_per_branch():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(4, 3)
            self.small = nn.Linear(4, 3)

        def forward(self, x):
            return self.big(x) if x.shape[0] > 6 else self.small(x)

    model = Branch()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    for b, used in [(3, "small"), (9, "big"), (4, "small"), (12, "big")]:
        model.zero_grad(set_to_none=True)
        bk(torch.randn(b, 4)).sum().backward()
        assert getattr(model, used).weight.grad is not None
        other = "big" if used == "small" else "small"
        assert getattr(model, other).weight.grad is None
    assert len(bk.programs) == 2


class ReducedPositions(nn.Module):
    """A positional lookup of arange(T) reduced over T before use: a value derived from the
    parameter alone, broadcast into the batch."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 4]
        return self.fc(x + self.pos(torch.arange(x.shape[1])).mean(0)).sum(1)


class SeqFirst(nn.Module):
    """LayerNorm on [T, B, 4]: the batch at dim 1, a row of the norm."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)

    def forward(self, x):  # [B, T, 4] -> LayerNorm on [T, B, 4]
        return self.ln(x.transpose(0, 1)).transpose(0, 1).sum(1)


class FoldedConv(nn.Module):
    """A conv on [2*B, C/2, H, W], the two channel halves of every sample in the two halves of
    dim 0 (``Sample(0, outer=2)``): its rule reads rows of one sample only as consecutive rows
    of dim 0 (``site.row_group``), so this layout is not one it reads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):  # [B, 4, 6, 6]
        b = x.shape[0]
        halves = x.reshape(b, 2, 2, 6, 6).transpose(0, 1).reshape(2 * b, 2, 6, 6)
        return self.conv(halves).reshape(2, b, -1).transpose(0, 1).reshape(b, -1)


@pytest.mark.parametrize("model, t", [(ReducedPositions(), 8), (SeqFirst(), 6)],
                         ids=["reduced-positions", "seq-first"])
def test_derived_and_seq_first_layouts_are_exact(model, t):
    """Formerly rejected: a value of the parameter alone, and a batch at dim 1 of a norm."""
    model = model.double()
    for b in (5, t):  # B == T: a size coincidence must not confuse the layouts
        x = torch.randn(b, t, 4, dtype=torch.float64)
        assert_matches_per_sample(model, lambda out, _: out.pow(2).sum(), (x, None),
                                  max_grad_norm=0.05, loss_reduction="sum", tol=1e-12)


def test_site_with_an_unreadable_batch_layout_rejected():
    """Without the batch where the rule reads it, the rule cannot separate samples: reject,
    naming the op, the parameter and the layout, never guess."""
    for b in (5, 8):
        with pytest.raises(UnsupportedModelError,
                           match=r"'conv.weight'.*argument 'input' has shape \['2\*s\d+', 2, 6"):
            fx_bk.transform(FoldedConv(), max_grad_norm=1.0)(torch.randn(b, 4, 6, 6))


class ReturnsBatchMean(nn.Module):
    """A per-feature mean over the batch as an output: not a per-sample quantity."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).mean(0)


class LogSumExpLoss(nn.Module):
    """Computes its own scalar loss, but not as a mean or sum of per-sample losses."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        per_sample = self.fc(x).pow(2).sum(1)
        return torch.logsumexp(per_sample, 0)


class MeanLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).pow(2).sum(1).mean()


@pytest.mark.parametrize(
    "model, reduction, match",
    [
        (ReturnsBatchMean(), "mean", r"op aten.mean .*reduces over the batch.*output 0"),
        (LogSumExpLoss(), "mean", r"mixes-samples.*op aten.logsumexp .*output 0"),
        (MeanLoss(), "sum", r"the mean over the batch .*pass loss_reduction='mean'"),
    ],
    ids=["vector-output", "logsumexp-loss", "reduction-mismatch"],
)
def test_batch_reduced_outputs_must_be_per_sample_losses(model, reduction, match):
    bk = fx_bk.transform(model, max_grad_norm=1.0, loss_reduction=reduction)
    with pytest.raises(UnsupportedModelError, match=match):
        bk(torch.randn(5, 4))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_model_returning_its_loss_matches_the_oracle(reduction):
    """A scalar loss computed inside the model is accepted as the loss_reduction of
    per-sample losses: the clipped sum equals the vmap oracle's."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = MeanLoss().double()
    if reduction == "sum":
        model.forward = lambda x: model.fc(x).pow(2).sum(1).sum()
    x = torch.randn(6, 4, dtype=torch.float64)
    model.zero_grad()
    fx_bk.transform(model, max_grad_norm=0.3, loss_reduction=reduction)(x).backward()
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],))), in_dims=(None, 0))(
        params, x)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    c = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", c, g[n]),
                                   rtol=1e-10, atol=1e-12)


def test_fallback_rule_refuses_large_per_sample_gradients(monkeypatch):
    """The vmap(vjp) fallback instantiates [B, *p.shape]; past its size limit the op gets the
    unsupported-op error instead of an out-of-memory."""
    from fx_bk.rules import generic

    monkeypatch.setattr(generic, "MAX_PER_SAMPLE_NUMEL", 2)
    model = nn.Sequential(nn.Linear(4, 3), nn.PReLU(3))
    with pytest.raises(UnsupportedModelError, match=r"op aten.prelu on parameter '1.weight'.*"
                       r"fallback would instantiate 3 gradient elements per sample"):
        fx_bk.transform(model, max_grad_norm=1.0)(torch.randn(2, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_conv_transpose_on_frames_folded_into_the_batch_is_exact(dtype):
    """A transposed convolution applied to ``[B*T, C, L]`` (each sample's T frames consecutive
    rows of dim 0) computes each row alone: its per-row gradients summed per sample
    (``site.row_group``) are the per-sample gradients, exact against the per-sample loop."""

    class Frames(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(2, 3, 3, stride=2)

        def forward(self, x):  # x: [B, T, 2, L]
            b, t = x.shape[:2]
            return self.up(x.reshape(b * t, *x.shape[2:])).reshape(b, -1).sum(1)

    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 5, dtype=dtype)
    assert_matches_per_sample(Frames().to(dtype), lambda out, _: out.mean(), (x, None),
                              max_grad_norm=0.5)
