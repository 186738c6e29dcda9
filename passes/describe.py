"""How problems name a node of the traced graph: its op and the user's source line."""

from __future__ import annotations

import torch

from fx_bk._torch_internals import op_display_name
from fx_bk.errors import Problem


def where(node: torch.fx.Node) -> str:
    """`` (at File "model.py", line 12, in forward)``: the innermost user frame, if recorded."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return f" (at {lines[-1]})" if lines else ""


def op_name(node: torch.fx.Node) -> str:
    """``aten.linear.default`` -> ``aten.linear``."""
    return op_display_name(node.target)


def shared_input_hint(prog) -> str:
    """For problems a shared input mistaken for a batched one would cause."""
    if sum(m.batched for m in prog.inputs) < 2:
        return ""
    return (". An input shared by all samples whose dim 0 equals the batch size is taken as "
            "batched unless declared: fx_bk.transform(..., unbatched=['<argument>'])")


def module_of(param: str) -> str:
    """The module path of a parameter name (``"<root>"`` for the model's own)."""
    return param.rpartition(".")[0] or "<root>"


def report_mixing(prog, mixed, what: str) -> None:
    """A ``mixes-samples`` problem for ``mixed`` (a ``batch_locations.Mixed``) reaching
    ``what``; once per op that mixed."""
    if mixed.origin.name in prog.mixing_reported:
        return
    prog.mixing_reported.add(mixed.origin.name)
    prog.problems.append(Problem(
        "mixes-samples",
        f"op {op_name(mixed.origin)}{where(mixed.origin)} {mixed.why}, so {what} depends on "
        f"several samples. Per-sample clipping needs each sample's outputs and loss to depend "
        f"on that sample only: no batch statistics (BatchNorm -> GroupNorm/LayerNorm), no "
        f"reductions, softmax, slicing or matrix products over the batch dimension"
        f"{shared_input_hint(prog)}",
    ))
