"""One smoke test per helper of ``fx_bk/_torch_internals/`` (the only door to private PyTorch
APIs), and a check that no other module of the library opens another door."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sympy
import torch

from fx_bk import _torch_internals as ti

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten


def test_pyproject_pins_the_tested_torch_series():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={ti.TESTED_TORCH},<' in pyproject
    assert torch.__version__.startswith(ti.TESTED_TORCH)


def test_every_table_entry_names_existing_helpers():
    for key in ti.PRIVATE_APIS:
        for name in key.split(" / "):
            obj = ti
            for part in name.strip().split("."):
                obj = getattr(obj, part)  # AttributeError: the table names a missing helper
            assert callable(obj) or isinstance(obj, type), name


_PRIVATE = re.compile(r"torch\._(?!check\b)[a-z]|\b_schema\b|\.node\.(expr|hint)\b|\._codegen\b|"
                      r"_adjusted_noise_multiplier")


@pytest.mark.parametrize("package", ["fx_bk", "passes"])
def test_no_private_torch_api_outside_the_door(package):
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        if "_torch_internals" in path.parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if _PRIVATE.search(code) and not code.strip().startswith(('"', "'", "`")):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "use a helper of fx_bk/_torch_internals:\n" + "\n".join(offenders)


def test_symbolic_batch_mode_shares_one_batch_symbol():
    mode = ti.SymbolicBatchMode()
    a = mode.fake(torch.empty(4, 3), batched=True)
    b = mode.fake(torch.empty(4, 5), batched=True)
    p = mode.fake(torch.empty(4, 3), batched=False)
    assert ti.sym_expr(a.shape[0]) == ti.sym_expr(b.shape[0]) == mode.batch_symbol
    assert p.shape == (4, 3) and all(isinstance(s, int) for s in p.shape)
    assert mode.specialized_batch() is None and ti.sym_hint(a.shape[0]) == 4
    with mode.fake_mode:
        _ = a.reshape(2, 2, 3)  # pins the batch to 4
    assert mode.specialized_batch() == 4


def test_guard_exprs_and_batch_condition():
    mode = ti.SymbolicBatchMode()
    a = mode.fake(torch.empty(6, 2), batched=True)
    with mode.fake_mode:
        assert bool(a.shape[0] > 3)  # adds a guard
    exprs = [e for e in mode.guard_exprs() if mode.batch_symbol in e.free_symbols]
    assert exprs
    sym = mode.batch_symbol
    assert all(ti.evaluate_size_condition(e, {sym: 6}) for e in exprs)
    assert not all(ti.evaluate_size_condition(e, {sym: 2}) for e in exprs)
    assert ti.sym_expr(3) == sympy.Integer(3) and ti.sym_hint(3) == 3
    assert ti.statically_known_true(a.shape[0] == a.shape[0])


def test_make_fx_functionalize_partition_and_flat_codegen():
    def joint(primals, tangents):
        (x,), (t,) = primals, tangents
        x = x.detach().requires_grad_()
        y = torch.sin(x)
        y.mul_(2)  # in place: functionalized away
        (g,) = torch.autograd.grad(y, x, t)
        return [y.detach(), g]

    gm = ti.make_fx(ti.functionalize(joint))([torch.randn(3)], [torch.ones(3)])
    ti.set_flat_codegen(gm)
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        n.name = n.target = "primals_1" if i == 0 else "tangents_1"
    gm.recompile()
    assert not any(getattr(n.target, "_schema", None) is not None
                   and n.target._schema.is_mutable for n in gm.graph.nodes)
    fw, bw = ti.partition_joint_graph(gm, num_fwd_outputs=1)
    x = torch.randn(3)
    out, *saved = fw(x)
    torch.testing.assert_close(out, 2 * torch.sin(x))
    (g,) = bw(*saved, torch.ones(3))
    torch.testing.assert_close(g, 2 * torch.cos(x))


def test_escape_outer_tracing_and_is_fake():
    mode = ti.SymbolicBatchMode()
    fake = mode.fake(torch.empty(2, 2), batched=True)
    assert ti.is_fake(fake) and not ti.is_fake(torch.empty(1))
    with mode.fake_mode, ti.escape_outer_tracing():
        real = torch.ones(2)
        assert not ti.is_fake(real) and torch.is_grad_enabled()
    with ti.disable_proxy_modes_tracing():
        assert torch.ones(1).item() == 1.0


def test_op_helpers_and_normalize_call():
    op = aten.linear.default
    assert ti.is_op_overload(op) and not ti.is_op_overload(torch.nn.functional.linear)
    assert ti.op_schema(op).name == "aten::linear"
    assert ti.op_display_name(op) == "aten.linear"
    assert ti.op_display_name(len) == "len"
    args = ti.normalize_call(op, (torch.randn(2, 3), torch.randn(4, 3)), {})
    assert set(args) == {"input", "weight", "bias"} and args["bias"] is None


def test_propagate_fake_values():
    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    mode = ti.SymbolicBatchMode()
    x = mode.fake(torch.empty(5, 2), batched=True)
    ti.propagate_fake_values(gm, mode.fake_mode, [x])
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert ti.sym_expr(out.meta["val"].shape[0]) == mode.batch_symbol


def test_mark_batch_dynamic_gives_one_compile():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    f = torch.compile(lambda x: x * 2, backend=counter, fullgraph=True)
    for b in (3, 5, 9):
        x = torch.randn(b, 2)
        ti.mark_batch_dynamic(x)
        f(x)
    assert counter.frame_count == 1


def test_docs_table_is_the_private_api_dict():
    doc = (ROOT / "docs" / "internals.md").read_text()
    table = re.search(r"<!-- apitable:start -->\n(.*?)\n<!-- apitable:end -->", doc, re.S)
    assert table is not None and table.group(1) == ti.private_api_table()
