"""``BKProgram``: the state the passes read and extend, one per traced input signature.

The site-level contract (``Site``, ``SiteValues``, ``InputMeta``, ``SizeGuard``, ``Strategy``)
lives in ``fx_bk/site.py``, below the rules; this module adds the program-level state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fx_bk.config import BKConfig
from fx_bk.errors import Problem
from fx_bk.rules import BundleHandler
from fx_bk.site import DerivedValue, InputMeta, Site, SizeGuard


@dataclass
class Bundle:
    """Sites whose trainable parameters overlap (tied weights, a module called twice): one
    per-sample gradient, one term of the norm, computed by one handler
    (``fx_bk/rules/shared.py``)."""

    sites: list[int]  # indices into BKProgram.sites
    handler: BundleHandler
    clip_group: int = 0  # index of its clipping group (config.clip_groups), 0 for all-layer


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
    record_key: int = 0  # the module's key in fx_bk.step_guard (tokens, last norms)
    autocast: tuple = ()  # fx_bk.autocast.AutocastState the forward is traced and run under
    # built while torch.compile traces the call: its graphs go to Inductor, which fuses the
    # joint trace's decompositions (fx_bk/backward_decompositions.py); eager keeps ATen's ops
    for_inductor: bool = False
    mode: Any = None  # _torch_internals.SymbolicBatchMode
    forward_graph: torch.fx.GraphModule | None = None  # params, buffers, inputs -> outputs
    output_layout: tuple | None = None
    num_outputs: int = 0  # the model's outputs (flattened)
    trace_batch: int = 0  # the batch size the trace was made with (the symbol's hint)
    trace_sizes: dict = field(default_factory=dict)  # every symbolic size's hint, by name
    size_guards: list[SizeGuard] = field(default_factory=list)  # re-checked per call
    fake_inputs: list[torch.Tensor] = field(default_factory=list)  # the forward graph's inputs
    derivation_nodes: set[str] = field(default_factory=set)  # parameter-only ops' nodes
    derived: dict[str, DerivedValue] = field(default_factory=dict)  # node -> value at the batch
    sites: list[Site] = field(default_factory=list)
    bundles: list[Bundle] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    num_aux_outputs: int = 0
    joint_graph: torch.fx.GraphModule | None = None
    fw_graph: torch.fx.GraphModule | None = None
    bw_graph: torch.fx.GraphModule | None = None
    backward_moves: int = 0  # backward nodes moved earlier by schedule_backward
    backward_peaks: tuple[int, int] = (0, 0)  # its peak_bytes before and after
    differentiable_outputs: list[bool] = field(default_factory=list)
    graded_params: list[str] = field(default_factory=list)  # trainable params with a site
    batch_locations: dict = field(default_factory=dict)  # node -> passes.batch_locations value
    mixing_reported: set[str] = field(default_factory=set)  # ops named in mixes-samples problems
    labelled_losses: list[str] = field(default_factory=list)  # loss ops given a label check

    def sources_of(self, name: str) -> tuple[str, ...]:
        """The trainable parameters behind a site's parameter name (a derived value's
        sources, or the parameter itself)."""
        for d in self.derived.values():
            if d.name == name:
                return d.sources
        return (name,)

    def trainable_shape(self, name: str) -> torch.Size:
        return self.fake_inputs[self.param_names.index(name)].shape

    @property
    def trainable_names(self) -> list[str]:
        return [n for n, t in zip(self.param_names, self.trainable) if t]

    def placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.forward_graph.graph.nodes if n.op == "placeholder"]

    def first_batched_input(self) -> int:
        """Index among the forward graph's placeholders of the first batched tensor input."""
        offset = len(self.param_names) + len(self.buffer_names)
        return offset + next(i for i, m in enumerate(self.inputs) if m.batched)
