"""``BKProgram``: the state the passes read and extend, one per traced input signature."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fx_bk._torch_internals import evaluate_batch_condition
from fx_bk.config import BKConfig
from fx_bk.errors import Problem


def per_sample_numel(shape: tuple) -> int:
    """Elements per sample of a site shape (``"B"`` marks the batch dim)."""
    n = 1
    for d in shape:
        n *= 1 if d == "B" else d
    return n


@dataclass(frozen=True)
class BatchGuard:
    """A condition on the batch size that the trace assumed (e.g. ``s0 < 16`` in a kernel's
    heuristic, or a branch of the model's forward)."""

    symbol: Any  # the trace's sympy batch symbol
    expr: Any  # sympy boolean in ``symbol``

    def holds(self, batch) -> bool:
        """Evaluate at ``batch`` (an int, or a SymInt under torch.compile: then the check
        becomes a guard of the compiled graph)."""
        return evaluate_batch_condition(self.expr, self.symbol, batch)


@dataclass(frozen=True)
class InputMeta:
    """Shape/dtype of one tensor input; ``batched`` ones have the symbolic batch as dim 0."""

    shape: tuple[int, ...]  # dim 0 is the example's batch size when batched
    dtype: torch.dtype
    device: torch.device
    batched: bool


@dataclass
class Site:
    """One op in the forward graph that consumes at least one trainable parameter."""

    node: str  # name of the op's node in the forward graph
    op: Any  # the aten OpOverload
    rule: Any  # the fx_bk.rules.Rule handling it
    params: dict[str, str]  # role ("weight", "bias") -> parameter name, trainable only
    tensor_args: dict[str, str]  # role -> node name of the activations the rule needs
    const_args: dict[str, Any]  # the op's other arguments (e.g. normalized_shape, eps)
    shapes: dict[str, tuple]  # role/"out" -> shape with "B" for the batch dim
    strategy: str = ""  # chosen by the rule's plan(), e.g. "ghost" / "instantiate"
    cost: int = 0  # multiply-adds per sample of the chosen strategy
    group_note: str = ""  # how a parameter shared with other sites is handled, if it is
    batch_layout: tuple | None = None  # see find_sites._unfold_batch; None: batch-first
    aux: dict[str, int] = field(default_factory=dict)  # role/"out" -> index among aux outputs


@dataclass
class BKProgram:
    model: torch.nn.Module
    config: BKConfig
    param_names: list[str]  # every parameter, named_parameters() order (ties deduplicated)
    trainable: list[bool]
    buffer_names: list[str]
    input_layout: tuple
    inputs: list[InputMeta]
    example_inputs: list[torch.Tensor] | None = None  # real tensors of the first call, if real
    record_key: int = 0  # where fx_bk.norm_record stores the last per-sample norms
    autocast: tuple = ()  # fx_bk.autocast.AutocastState the forward is traced and run under
    mode: Any = None  # _torch_internals.SymbolicBatchMode
    forward_graph: torch.fx.GraphModule | None = None  # params, buffers, inputs -> outputs
    output_layout: tuple | None = None
    num_outputs: int = 0
    trace_batch: int = 0  # the batch size the trace was made with (the symbol's hint)
    batch_guards: list[BatchGuard] = field(default_factory=list)
    fake_inputs: list[torch.Tensor] = field(default_factory=list)  # the forward graph's inputs
    sites: list[Site] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)  # site indices sharing parameters
    group_handlers: list = field(default_factory=list)  # per group: computes norm and grads
    group_clip: list[int] = field(default_factory=list)  # per group: its clipping group
    problems: list[Problem] = field(default_factory=list)
    num_aux_outputs: int = 0
    joint_graph: torch.fx.GraphModule | None = None
    fw_graph: torch.fx.GraphModule | None = None
    bw_graph: torch.fx.GraphModule | None = None
    differentiable_outputs: list[bool] = field(default_factory=list)
    graded_params: list[str] = field(default_factory=list)  # trainable params with a site

    @property
    def trainable_names(self) -> list[str]:
        return [n for n, t in zip(self.param_names, self.trainable) if t]

    def placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.forward_graph.graph.nodes if n.op == "placeholder"]
