"""Pass 6: check that no sample's values depend on another sample (DP's core assumption).

BK assumes ``dL/ds_i`` is sample i's own gradient and that sample i's activations come from
sample i alone. A forward that mixes samples (batch statistics, a reduction or softmax over dim 0,
``x - x.mean(0)``) breaks that silently, so at trace time the forward graph is run twice on a
small real batch, the second time with sample 0 perturbed (same RNG state, so dropout masks
agree); the first op at which another sample's value moves is reported.

A loss computed inside the model (Hugging Face ``labels=``) is a reduction over the batch by
design. Ops that reduce over the batch are accepted after the last site (in the "loss tail":
no site reads them) when they produce a model output that is one number. That number must then
be the ``loss_reduction`` of per-sample losses: on the example batch, the output must equal the
mean (or sum) of the same output computed on each sample alone, dropout off. This catches a
``sum``/``mean`` mismatch, a softmax over the batch, and a token mean over ``B*T`` whose padding
differs between samples (its divisor, the batch's count of labelled tokens, couples samples).
"""

from __future__ import annotations

import torch

from fx_bk._torch_internals import sym_expr
from fx_bk.autocast import disabled, entered
from fx_bk.errors import Problem

from .describe import op_name, where
from .program import BKProgram

CHECK_BATCH = 3
aten = torch.ops.aten
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}


def _example_batch(prog: BKProgram) -> list[torch.Tensor]:
    real = prog.example_inputs
    out = []
    gen = torch.Generator().manual_seed(0)
    for i, m in enumerate(prog.inputs):
        x = real[i] if real is not None else None
        if not m.batched:
            out.append(x if x is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device))
            continue
        if x is not None:
            reps = -(-CHECK_BATCH // x.shape[0])
            x = x[:CHECK_BATCH].repeat(reps, *([1] * (x.dim() - 1)))[:CHECK_BATCH]
        else:
            shape = (CHECK_BATCH, *m.shape[1:])
            if m.dtype.is_floating_point or m.dtype.is_complex:
                x = torch.randn(shape, generator=gen).to(m.dtype)
            elif m.dtype == torch.bool:
                x = torch.ones(shape, dtype=torch.bool)
            else:
                x = torch.randint(0, 2, shape, generator=gen).to(m.dtype)
        out.append(x.to(m.device).clone())
    return out


def _perturb_first_sample(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    if x.dtype.is_floating_point:
        y[0] = x[0] + torch.randn(x[0].shape, generator=torch.Generator().manual_seed(1)).to(
            x.device, x.dtype
        )
    elif x.dtype != torch.bool and x.numel() and x.min() >= 0 and x.max() > 0:
        y[0] = (x[0] + 1) % (x.max() + 1)  # stays within the values the batch already uses
    return y


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, dropout: bool = True):
        super().__init__(gm)
        self.values: dict[torch.fx.Node, torch.Tensor] = {}
        self.dropout = dropout

    def call_function(self, target, args, kwargs):
        if not self.dropout:
            if target in _DROPOUTS:
                return args[0].clone()
            if target is aten.native_dropout.default:
                return args[0].clone(), torch.ones_like(args[0], dtype=torch.bool)
            if target is aten.scaled_dot_product_attention.default:  # attention dropout
                if len(args) > 4:
                    args = (*args[:4], 0.0, *args[5:])
                else:
                    kwargs = {**kwargs, "dropout_p": 0.0}
        return super().call_function(target, args, kwargs)

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n] = out.detach().clone()  # clone: later in-place ops must not alter it
        return out


def _batch_dim(node: torch.fx.Node, symbol) -> int | None:
    """The dim of ``node`` that is exactly the batch, -1 if none depends on it, None if the
    batch is folded into a dim with others (e.g. ``[B*T, d]``: no per-sample view)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    folded = False
    for i, size in enumerate(val.shape):
        if isinstance(size, torch.SymInt):
            if sym_expr(size) == symbol:
                return i
            folded = folded or symbol in sym_expr(size).free_symbols
    return None if folded else -1


def _run(prog, flat, dropout: bool = True, amp: bool = True):
    """Run the forward graph on real tensors, under the program's autocast state (``amp``) or
    with autocast off."""
    rec = _Recorder(prog.forward_graph, dropout)
    devices = [t.device for t in flat if t.device.type == "cuda"][:1]
    amp_state = entered(prog.autocast) if amp else disabled(prog.autocast)
    with torch.random.fork_rng(devices=devices), torch.no_grad(), amp_state:
        torch.manual_seed(0)
        outs = rec.run(*flat)
    return rec.values, outs


def _site_ancestors(prog: BKProgram) -> set[torch.fx.Node]:
    """Every node whose value reaches a site (the sites included)."""
    by_name = {n.name: n for n in prog.forward_graph.graph.nodes}
    todo = [by_name[s.node] for s in prog.sites]
    seen = set(todo)
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _moved(a: torch.Tensor, b: torch.Tensor, dim: int) -> bool:
    """Did anything but sample 0 (along ``dim``; -1: no batch dim, the whole tensor) change?"""
    if dim >= 0:
        a, b = a.narrow(dim, 1, a.shape[dim] - 1), b.narrow(dim, 1, b.shape[dim] - 1)
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        return not torch.equal(a, b)
    # Rounding noise is not coupling: a GEMM's rows are not bitwise reproducible between two
    # runs (MKL/oneDNN pick blockings by the threads they get: GPT-2's tanh-GELU moved by ~1e-6
    # of its max when another process shared the cores). A batch statistic moves the other
    # samples by O(1/B), far above this tolerance.
    rel = 1e-9 if a.dtype in (torch.float64, torch.complex128) else 1e-4
    a, b = a.double(), b.double()
    scale = torch.nan_to_num(a.abs().max(), nan=0.0, posinf=0.0).item() + 1e-30
    return not torch.allclose(a, b, rtol=0, atol=rel * scale, equal_nan=True)


def check_sample_independence(prog: BKProgram) -> None:
    if any(p.kind in ("batch-size-specialized", "no-batch-input") for p in prog.problems):
        return  # no batch to perturb
    model = prog.model
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = [params[n].detach() for n in prog.param_names]
    state += [buffers[n].detach().clone() for n in prog.buffer_names]  # never the model's own
    batch = _example_batch(prog)
    moved_inputs = [_perturb_first_sample(x) if m.batched else x
                    for x, m in zip(batch, prog.inputs)]
    try:
        base, base_out = _run(prog, state + batch)
        other, _ = _run(prog, state + moved_inputs)
    except Exception as e:  # noqa: BLE001 - report, never let a check crash silently
        prog.problems.append(_check_failed(e))
        return
    symbol = prog.mode.batch_symbol
    feeds_sites = _site_ancestors(prog)
    reduced: set[torch.fx.Node] = set()  # loss-tail values that no longer have a batch dim
    for node, value in base.items():
        if node.op == "placeholder" or node not in other:
            continue
        dim = _batch_dim(node, symbol)
        if dim is None or not _moved(value, other[node], dim):
            continue
        if dim == -1 and node not in feeds_sites:
            reduced.add(node)
            continue
        node = _first_reduction(node, reduced)
        prog.problems.append(Problem(
            "mixes-samples",
            f"op {op_name(node)}{where(node)} mixes samples across the batch dimension: "
            f"changing sample 0 changed the other samples' values. Per-sample clipping "
            f"needs each sample's output to depend on that sample only: no batch statistics "
            f"(BatchNorm -> GroupNorm/LayerNorm), no reductions or softmax over dim 0",
        ))
        return
    outputs = list(prog.forward_graph.graph.output_node().args[0])[: prog.num_outputs]
    for k, node in enumerate(outputs):
        if node in reduced:
            _check_batch_loss(prog, k, node, state, batch, base_out[k])


def _first_reduction(node: torch.fx.Node, reduced: set) -> torch.fx.Node:
    """The op to blame for ``node`` mixing samples: its earliest ancestor that reduced over the
    batch (``h - h.mean(0)`` blames the mean), else ``node`` itself."""
    seen, todo, found = {node}, [node], []
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
                if parent in reduced:
                    found.append(parent)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return min(found, key=order.__getitem__) if found else node


def _check_failed(e: Exception) -> Problem:
    return Problem(
        "check-failed",
        f"running the forward on a small example batch to check that samples do not mix "
        f"failed ({type(e).__name__}: {e}); call the model once on real data first",
    )


def _check_batch_loss(prog, k, node, state, batch, value) -> None:
    """Output ``k`` is reduced over the batch: accept it only as the ``loss_reduction`` of
    per-sample losses (see the module docstring)."""
    what = f"output {k} (op {op_name(node)}{where(node)})"
    if value.numel() != 1 or not value.dtype.is_floating_point:
        prog.problems.append(Problem(
            "mixes-samples",
            f"{what} is reduced over the batch but is not a scalar loss: return per-sample "
            f"values (batch dim first) and reduce them in the loss",
        ))
        return
    n = batch[next(i for i, m in enumerate(prog.inputs) if m.batched)].shape[0]
    try:  # autocast off: bf16 rounding differs between batch shapes by more than the tolerance
        whole = _run(prog, state + batch, dropout=False, amp=False)[1][k].double()
        alone = torch.stack([
            _run(prog, state + [x[i : i + 1] if m.batched else x
                                for x, m in zip(batch, prog.inputs)],
                 dropout=False, amp=False)[1][k]
            for i in range(n)
        ]).double().flatten()
    except Exception as e:  # noqa: BLE001
        prog.problems.append(_check_failed(e))
        return
    reduction = prog.config.loss_reduction
    expected = alone.mean() if reduction == "mean" else alone.sum()
    tol = 1e-4 * max(alone.abs().max().item(), whole.abs().item()) + 1e-12
    if abs(whole.item() - expected.item()) <= tol:
        return
    other = "sum" if reduction == "mean" else "mean"
    hint = (f"it is the {other} of them: pass loss_reduction={other!r} to fx_bk.transform"
            if abs(whole.item() - (alone.sum() if other == "sum" else alone.mean()).item()) <= tol
            else "a token-level mean over B*T whose samples have different numbers of labelled "
                 "tokens (padding) couples samples through its divisor, and so does any "
                 "normalization over the batch; return logits and compute a per-sample loss "
                 "outside the model with fx_bk.sequence_cross_entropy(logits, labels), then "
                 ".mean()")
    prog.problems.append(Problem(
        "loss-not-per-sample",
        f"{what} is a loss reduced over the batch, but on the example batch it is "
        f"{whole.item():.6g}, not the {reduction} of the per-sample losses "
        f"({expected.item():.6g}): {hint}",
    ))


def summarize(prog: BKProgram) -> str:
    return "\n  ".join([f"{len(prog.problems)} problems in total", *map(str, prog.problems)])
