"""The public API: arguments, signature, outputs, parameter sharing, modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
from fx_bk.testing import fx_bk_grads, max_rel_err, vmap_clipped_sum
from fx_bk.testing.models import MODELS, batch_for


class KwargsModel(nn.Module):
    """Keyword arguments, a non-batched tensor argument, a constant and a nested output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.gate = nn.Linear(4, 3)

    def forward(self, x, *, scale: torch.Tensor, extra=None, use_gate: bool = True):
        h = self.fc(x) * scale  # scale: [3], no batch dim
        if use_gate:
            h = h * torch.sigmoid(self.gate(x))
        if extra is not None:
            h = h + extra["bias"]
        return h, {"hidden": h.detach(), "n": 3}


def test_shares_parameters_and_optimizer_works_on_either():
    model = MODELS["mlp"]()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    assert [id(p) for p in bk.parameters()] == [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(bk.parameters(), lr=0.1)
    x, y = batch_for("mlp", model, 8, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(bk(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_kwargs_constants_and_nested_outputs():
    model = KwargsModel().double()
    bk = fx_bk.transform(model, max_grad_norm=0.2, loss_reduction="sum")
    x = torch.randn(5, 4, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64)
    extra = {"bias": torch.randn(5, 3, dtype=torch.float64)}
    for use_gate in (True, False):
        out, aux = bk(x, scale=scale, extra=extra, use_gate=use_gate)
        ref_out, ref_aux = model(x, scale=scale, extra=extra, use_gate=use_gate)
        assert torch.allclose(out, ref_out) and aux["n"] == 3
        model.zero_grad()
        out.pow(2).sum().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in model.named_parameters()}

        def one(p, xi, bi, use_gate=use_gate):
            o, _ = functional_call(model, p, (xi[None],), dict(
                scale=scale, extra={"bias": bi[None]}, use_gate=use_gate))
            return o.pow(2).sum()

        g = vmap(grad(one), (None, 0, 0))(params, x, extra["bias"])
        if not use_gate:
            g = {n: v for n, v in g.items() if n.startswith("fc.")}
        norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
        c = (0.2 / (norms + 1e-6)).clamp(max=1)
        ref = {n: torch.einsum("b,b...->...", c, v) for n, v in g.items()}
        assert max_rel_err({n: got[n] for n in ref}, ref) <= 1e-10
    assert len(bk.programs) == 2  # one per value of the constant use_gate


def test_grads_accumulate_like_autograd():
    model = MODELS["mlp"]().double()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    x, y = batch_for("mlp", model, 6, seed=0, dtype=torch.float64)
    x2, y2 = batch_for("mlp", model, 4, seed=1, dtype=torch.float64)
    model.zero_grad()
    F.cross_entropy(bk(x), y).backward()
    F.cross_entropy(bk(x2), y2).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    ref1, ref2 = vmap_clipped_sum(model, x, y, 0.1), vmap_clipped_sum(model, x2, y2, 0.1)
    assert max_rel_err(got, {n: ref1[n] + ref2[n] for n in ref1}) <= 1e-10


def test_train_mode_with_dropout_and_eval_mode():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    model.train()
    F.cross_entropy(bk(x), y).backward()
    model.eval()
    model.zero_grad()
    got = fx_bk_grads(bk, model, x, y, "mean")
    assert max_rel_err(got, vmap_clipped_sum(model, x, y, 1.0)) <= 1e-5
    assert len(bk.programs) == 2


def test_dropout_per_sample_gradients_exact_for_the_sampled_mask():
    """In train mode the gradient is exact for the mask drawn: replay it with the same seed."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    bk = fx_bk.transform(model, max_grad_norm=1e3, loss_reduction="sum")
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    bk(x)  # build
    torch.manual_seed(7)
    got = fx_bk_grads(bk, model, x, y, "sum")
    torch.manual_seed(7)
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()  # R huge: clipped == plain
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert max_rel_err(got, ref) <= 1e-10


def test_wrapper_forwards_attributes_and_checks_the_call_signature():
    model = KwargsModel()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    assert bk.fc is model.fc and bk.training
    with pytest.raises(TypeError, match=r"KwargsModel.forward\(\) called through fx_bk"):
        bk(torch.randn(3, 4), torch.rand(3))  # scale is keyword-only


def test_explain_lists_every_site_with_rule_strategy_and_cost():
    from fx_bk.testing.models import TransformerStyle

    model = TransformerStyle()
    x, _ = batch_for("transformer", model, 4, seed=0)
    report = fx_bk.explain(model, x)
    rows = [[c.strip() for c in ln.strip("|").split("|")]
            for ln in report.splitlines() if ln.startswith("| ") and "aten." in ln]
    by_module = {r[2]: (r[1], r[5], r[6], int(r[7].replace(",", ""))) for r in rows}
    assert by_module == {
        "emb": ("aten.embedding.default", "embedding", "ghost", 7 * 7 * 16),
        "ln1": ("aten.layer_norm.default", "layer_norm", "instantiate", 32),
        "ln2": ("aten.layer_norm.default", "layer_norm", "instantiate", 32),
        "qkv": ("aten.linear.default", "linear", "ghost", 7 * 7 * (16 + 48)),
        "proj": ("aten.linear.default", "linear", "ghost", 7 * 7 * 32),
        "fc1": ("aten.linear.default", "linear", "ghost", 7 * 7 * 48),
        "fc2": ("aten.linear.default", "linear", "ghost", 7 * 7 * 48),
        "head": ("aten.linear.default", "linear", "rank-one", 16 + 5),
    }


def test_fx_bk_imports_without_opacus_and_the_engine_says_what_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['opacus'] = None\n"
            "import fx_bk\n"
            "try:\n    fx_bk.PrivacyEngine\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'fx_bk[privacy]'" in out.stdout
