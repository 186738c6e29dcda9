"""Hugging Face models built from configs (no downloads), unmodified, vs a per-sample loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fx_bk
from fx_bk.testing import loop_clipped_sum, max_rel_err

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied

    def loss(out, x):  # next-token loss, mean over positions: one number per sample
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="none").view(x.shape[0], -1).mean(1)

    return model, lambda g, b: torch.randint(0, 50, (b, 8), generator=g), loss


def bert():
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    return (model, lambda g, b: torch.randint(1, 60, (b, 7), generator=g),  # label: x[:, 0] % 3
            lambda out, x: F.cross_entropy(out.logits, x[:, 0] % 3, reduction="none"))


def vit():
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )
    model = transformers.ViTForImageClassification(cfg)

    def label(x):  # a function of the sample itself
        return (x[:, 0, 0, :3] > 0).long().sum(1) % 3

    return (model, lambda g, b: torch.randn(b, 3, 8, 8, generator=g),
            lambda out, x: F.cross_entropy(out.logits, label(x), reduction="none"))


@pytest.mark.parametrize("build", [gpt2, bert, vit], ids=["gpt2", "bert", "vit"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_hf_model_matches_per_sample_loop(build, compiled):
    torch.manual_seed(0)
    model, make_input, per_sample_loss = build()
    model.eval()  # dropout off (rates are 0 anyway) for the comparison
    model = model.double() if not compiled else model
    tol = 1e-5 if compiled else 1e-10
    norm = 0.05
    bk = fx_bk.transform(model, max_grad_norm=norm)
    if compiled:
        bk = torch.compile(bk, fullgraph=True)
    for b in (1, 5):
        x = make_input(torch.Generator().manual_seed(b), b)
        if x.is_floating_point():
            x = x.to(next(model.parameters()).dtype)
        model.zero_grad(set_to_none=True)
        per_sample_loss(bk(x), x).mean().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        ref = loop_clipped_sum(model, x, per_sample_loss, norm)
        err = max_rel_err(got, ref)
        assert err <= tol, f"{build.__name__} B={b}: rel err {err:.2e}"


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_computing_its_own_loss_from_labels(build, compiled):
    """``model(x, labels=y).loss`` is a mean over the batch (GPT-2: over B*T tokens, which with
    no padding is the mean over samples of each sample's token mean): loss_reduction="mean"."""
    torch.manual_seed(0)
    model, make_input, _ = build()
    model.eval()
    model = model.double() if not compiled else model
    labels = (lambda x: x) if build is gpt2 else (lambda x: x[:, 0] % 3)
    bk = fx_bk.transform(model, max_grad_norm=0.05)
    if compiled:
        bk = torch.compile(bk, fullgraph=True)
    for b in (1, 5):
        x = make_input(torch.Generator().manual_seed(b), b)
        model.zero_grad(set_to_none=True)
        bk(input_ids=x, labels=labels(x)).loss.backward()
        ref = loop_clipped_sum(model, x, None, 0.05,
                               loss_of=lambda m, xi: m(input_ids=xi, labels=labels(xi)).loss)
        err = max_rel_err(_grads(model), ref)
        # GPT-2's own loss casts the logits to float32 (transformers' ForCausalLMLoss), so in
        # a float64 model it is float32-accurate only
        tol = 1e-5 if compiled else 1e-10 if build is bert else 1e-6
        assert err <= tol, f"B={b}: rel err {err:.2e}"


def test_labels_loss_with_wrong_reduction_is_rejected():
    model, make_input, _ = gpt2()
    bk = fx_bk.transform(model.eval(), max_grad_norm=1.0, loss_reduction="sum")
    x = make_input(torch.Generator().manual_seed(0), 4)
    with pytest.raises(fx_bk.UnsupportedModelError, match="loss_reduction='mean'"):
        bk(input_ids=x, labels=x)


def test_token_mean_with_uneven_padding_is_rejected_and_the_per_sample_loss_is_exact():
    """HF's token mean divides by the batch's labelled-token count: with padding that differs
    between samples it couples them. fx_bk refuses it and points to sequence_cross_entropy,
    which is exact against the per-sample loop."""
    torch.manual_seed(0)
    model, make_input, _ = gpt2()
    model = model.eval().double()
    x = make_input(torch.Generator().manual_seed(0), 4)
    labels = x.clone()
    labels[0, 5:] = -100
    labels[2, 3:] = -100
    with pytest.raises(fx_bk.UnsupportedModelError, match="sequence_cross_entropy"):
        fx_bk.transform(model, max_grad_norm=0.05)(input_ids=x, labels=labels)

    # the helper, per sample, is what Hugging Face computes for that sample alone
    for i in range(4):
        hf = model(input_ids=x[i : i + 1], labels=labels[i : i + 1]).loss
        ours = fx_bk.sequence_cross_entropy(model(input_ids=x[i : i + 1]).logits,
                                            labels[i : i + 1], shift=True)
        assert torch.allclose(ours, hf.to(ours.dtype), rtol=1e-6)  # HF's loss is float32

    bk = fx_bk.transform(model, max_grad_norm=0.05)
    model.zero_grad(set_to_none=True)
    fx_bk.sequence_cross_entropy(bk(input_ids=x).logits, labels, shift=True).mean().backward()
    row = {tuple(r.tolist()): i for i, r in enumerate(x)}

    def loss_of(m, xi):
        i = row[tuple(xi[0].tolist())]
        return fx_bk.sequence_cross_entropy(m(input_ids=xi).logits, labels[i : i + 1],
                                            shift=True).sum()

    assert max_rel_err(_grads(model), loop_clipped_sum(model, x, None, 0.05, loss_of)) <= 1e-10


class _Logits(torch.nn.Module):
    """Opacus's loss wrapper takes a tensor output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def test_vit_matches_opacus_ghost_clipping():
    """Of the three, ViT is the one Opacus 1.6 ghost clipping computes (BERT: it fails in a
    view of its hooks; GPT-2: tied weights are unsupported). Opacus only hooks modules in train
    mode; the dropout rates are 0."""
    from fx_bk.testing import opacus_clipped_sum

    torch.manual_seed(0)
    model, make_input, per_sample_loss = vit()
    model = model.train().double()
    x = make_input(torch.Generator().manual_seed(5), 5).double()
    label = (x[:, 0, 0, :3] > 0).long().sum(1) % 3
    ref = {k.removeprefix("model."): v
           for k, v in opacus_clipped_sum(_Logits(model), x, label, 0.05, "mean").items()}
    bk = fx_bk.transform(model, max_grad_norm=0.05)
    model.zero_grad(set_to_none=True)
    per_sample_loss(bk(x), x).mean().backward()
    assert max_rel_err(_grads(model), ref) <= 1e-10


def test_hf_model_in_train_mode_with_dropout_is_accepted():
    """Dropout 0.1 everywhere, train mode: the sample-independence check (same RNG for both of
    its runs) passes and training steps run; exactness for a sampled mask is in test_api."""
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                  use_cache=False)
    assert cfg.resid_pdrop == cfg.attn_pdrop == cfg.embd_pdrop == 0.1
    model = transformers.GPT2LMHeadModel(cfg).train()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    x = torch.randint(0, 50, (4, 8))
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        bk(input_ids=x, labels=x).loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert 0 < bk.last_per_sample_norms.min()
