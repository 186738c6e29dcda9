"""The ``torch.autograd.Function`` that runs a built BK program's forward and backward graphs.

``BKFunction.apply(compiled, *params, *buffers, *inputs, clip_bounds)``: the forward graph's
outputs; its backward runs the backward graph (output gradients, per-sample norms, clip
factors, clipped sums: ``passes/build_joint.py``) and returns each trainable parameter's clipped
gradient sum. ``fx_bk/runtime.py`` (``BKModule``) decides which program runs.
"""

from __future__ import annotations

import torch

from passes import BKProgram

from . import autocast as amp


class BKFunction(torch.autograd.Function):
    """forward: ``fw_graph(primals)``; backward: ``bw_graph(saved, tangents)`` -> clipped grads."""

    @staticmethod
    def forward(ctx, compiled, *primals):
        prog = compiled.prog
        with amp.disabled(prog.autocast):
            results = prog.fw_graph(*primals)
        outs, saved = results[: prog.num_outputs], results[prog.num_outputs :]
        tensors = [s for s in saved if isinstance(s, torch.Tensor)]
        ctx.symints = [s for s in saved if not isinstance(s, torch.Tensor)]
        ctx.saved_is_tensor = [isinstance(s, torch.Tensor) for s in saved]
        ctx.save_for_backward(*tensors)
        ctx.compiled = compiled
        ctx.mark_non_differentiable(
            *[o for o, d in zip(outs, prog.differentiable_outputs) if not d]
        )
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        compiled = ctx.compiled
        prog = compiled.prog
        tensors, symints = iter(ctx.saved_tensors), iter(ctx.symints)
        saved = [next(tensors) if t else next(symints) for t in ctx.saved_is_tensor]
        tangents = [
            g.contiguous() for g, d in zip(grad_outputs, prog.differentiable_outputs) if d
        ]
        grads = compiled.run_backward(saved, tangents)
        return (None, *compiled.primal_grads(grads))


class CompiledProgram:
    """A built ``BKProgram`` plus the bookkeeping to map its outputs onto the primals."""

    def __init__(self, prog: BKProgram):
        self.prog = prog
        bw_inputs = [n.name for n in prog.bw_graph.graph.nodes if n.op == "placeholder"]
        fw_outputs = [str(n) for n in prog.fw_graph.graph.output_node().args[0]]
        saved_names = fw_outputs[prog.num_outputs :]
        # the backward graph's inputs, by name: some of the forward's saved values, then
        # tangents_k (the k-th differentiable output's gradient)
        tangents = [n for n in bw_inputs if n.startswith("tangents_")]
        self.saved_order = [saved_names.index(n) for n in bw_inputs if n not in tangents]
        self.tangent_order = [int(n.removeprefix("tangents_")) - 1 for n in tangents]
        index = {name: i for i, name in enumerate(prog.param_names)}
        self.grad_slots = [index[n] for n in prog.graded_params]
        # params, buffers, inputs and the clipping bounds (``BKModule.clip_bounds``)
        self.num_primals = len(prog.param_names) + len(prog.buffer_names) + len(prog.inputs) + 1

    def run_backward(self, saved, tangents):
        with amp.disabled(self.prog.autocast):
            return self.prog.bw_graph(
                *[saved[i] for i in self.saved_order], *[tangents[k] for k in self.tangent_order]
            )

    def primal_grads(self, grads):
        out = [None] * self.num_primals
        for slot, g in zip(self.grad_slots, grads):
            out[slot] = g
        return out
