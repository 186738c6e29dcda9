"""Pass 6: check that no sample's values depend on another sample (DP's core assumption).

BK assumes ``dL/ds_i`` is sample i's own gradient and that sample i's activations come from
sample i alone. A forward that mixes samples (batch statistics, a reduction or softmax over dim 0,
``x - x.mean(0)``) breaks that silently, so at trace time the forward graph is run twice on a
small real batch, the second time with sample 0 perturbed (same RNG state, so dropout masks
agree); the first op at which another sample's value moves is reported.
"""

from __future__ import annotations

import torch

from fx_bk.errors import Problem

from .find_sites import op_name, where
from .program import BKProgram

CHECK_BATCH = 3


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
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[torch.fx.Node, torch.Tensor] = {}

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
            if size.node.expr == symbol:
                return i
            folded = folded or symbol in size.node.expr.free_symbols
    return None if folded else -1


def _run(prog, flat):
    rec = _Recorder(prog.forward_graph)
    devices = [t.device for t in flat if t.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(0)
        rec.run(*flat)
    return rec.values


def _moved(a: torch.Tensor, b: torch.Tensor, dim: int) -> bool:
    """Did anything but sample 0 (along ``dim``; -1: no batch dim, the whole tensor) change?"""
    if dim >= 0:
        a, b = a.narrow(dim, 1, a.shape[dim] - 1), b.narrow(dim, 1, b.shape[dim] - 1)
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        return not torch.equal(a, b)
    a, b = a.double(), b.double()
    scale = torch.nan_to_num(a.abs().max(), nan=0.0, posinf=0.0).item() + 1e-30
    return not torch.allclose(a, b, rtol=0, atol=1e-6 * scale, equal_nan=True)


def check_sample_independence(prog: BKProgram) -> None:
    if any(p.kind in ("batch-size-specialized", "no-batch-input") for p in prog.problems):
        return  # no batch to perturb
    model = prog.model
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = [params[n].detach() for n in prog.param_names]
    state += [buffers[n].detach() for n in prog.buffer_names]
    batch = _example_batch(prog)
    moved_inputs = [_perturb_first_sample(x) if m.batched else x
                    for x, m in zip(batch, prog.inputs)]
    try:
        base = _run(prog, state + batch)
        other = _run(prog, state + moved_inputs)
    except Exception as e:  # noqa: BLE001 - report, never let a check crash silently
        prog.problems.append(Problem(
            "check-failed",
            f"running the forward on a small example batch to check that samples do not mix "
            f"failed ({type(e).__name__}: {e}); call the model once on real data first",
        ))
        return
    symbol = prog.mode.batch_symbol
    for node, value in base.items():
        if node.op == "placeholder" or node not in other:
            continue
        dim = _batch_dim(node, symbol)
        if dim is not None and _moved(value, other[node], dim):
            prog.problems.append(Problem(
                "mixes-samples",
                f"op {op_name(node)}{where(node)} mixes samples across the batch dimension: "
                f"changing sample 0 changed the other samples' values. Per-sample clipping "
                f"needs each sample's output to depend on that sample only: no batch statistics "
                f"(BatchNorm -> GroupNorm/LayerNorm), no reductions or softmax over dim 0",
            ))
            return
