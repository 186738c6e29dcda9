"""torch.compile: fullgraph, no graph breaks, few compiles across batch sizes, same grads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import fx_bk
from fx_bk.testing import fx_bk_grads, max_rel_err
from fx_bk.testing.models import MODELS, batch_for

# B = 1 is tested apart: Dynamo specializes sizes 0 and 1 itself (one more compile, any model)
BATCH_SIZES = (8, 16, 5, 33, 12)


def test_zero_graph_breaks():
    model = MODELS["transformer"]()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    x, _ = batch_for("transformer", model, 4, seed=0)
    explanation = torch._dynamo.explain(bk)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _compiles(bk, model, name, mark_dynamic: bool, **compile_kwargs) -> int:
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(bk, backend=counter, fullgraph=True, **compile_kwargs)
    eager = fx_bk.transform(model, max_grad_norm=bk.bk_config.max_grad_norm)
    for b in BATCH_SIZES:
        x, y = batch_for(name, model, b, seed=b)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 0)
        got = fx_bk_grads(compiled, model, x, y, "mean")
        ref = fx_bk_grads(eager, model, x, y, "mean")
        assert max_rel_err(got, ref) <= 1e-5
    return counter.frame_count


def test_automatic_dynamic_compiles_at_most_twice():
    model = MODELS["transformer"]()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    assert _compiles(bk, model, "transformer", mark_dynamic=False) <= 2


def test_mark_dynamic_compiles_once():
    model = MODELS["mlp"]()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    assert _compiles(bk, model, "mlp", mark_dynamic=True) == 1


def test_dynamic_true_compiles_once():
    model = MODELS["reused"]()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    assert _compiles(bk, model, "reused", mark_dynamic=False, dynamic=True) == 1


def test_first_call_compiled_at_batch_size_one_inductor():
    """The BK trace is built inside torch.compile's tracing, from a batch of one."""
    model = MODELS["transformer"]()
    compiled = torch.compile(fx_bk.transform(model, max_grad_norm=0.5), fullgraph=True)
    eager = fx_bk.transform(model, max_grad_norm=0.5)
    for b in (1, 6, 1):
        x, y = batch_for("transformer", model, b, seed=b)
        assert max_rel_err(fx_bk_grads(compiled, model, x, y, "mean"),
                           fx_bk_grads(eager, model, x, y, "mean")) <= 1e-5


def test_two_transformed_modules_never_share_compiled_code():
    """Same model, same shapes, different max_grad_norm: each compiled module is its own."""
    model = MODELS["mlp"]()
    x, y = batch_for("mlp", model, 6, seed=0)
    grads = []
    for norm in (1e-3, 1e3):
        compiled = torch.compile(fx_bk.transform(model, max_grad_norm=norm), fullgraph=True)
        grads.append(fx_bk_grads(compiled, model, x, y, "mean"))
    ref = fx_bk_grads(fx_bk.transform(model, max_grad_norm=1e3), model, x, y, "mean")
    assert max_rel_err(grads[1], ref) <= 1e-5
    assert max_rel_err(grads[0], ref) > 0.5


def test_compiled_training_loop_matches_eager():
    torch.manual_seed(0)
    models = [MODELS["transformer"]() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    steps = []
    for i, model in enumerate(models):
        bk = fx_bk.transform(model, max_grad_norm=0.5)
        if i == 1:
            bk = torch.compile(bk, fullgraph=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for b in (4, 9, 4):
            x, y = batch_for("transformer", model, b, seed=b)
            opt.zero_grad()
            F.cross_entropy(bk(x), y).backward()
            opt.step()
        steps.append(dict(model.named_parameters()))
    assert max_rel_err(steps[1], steps[0]) <= 1e-5
