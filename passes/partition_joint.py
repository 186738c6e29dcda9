"""Pass 9: split the joint graph into a forward graph and a backward graph.

PyTorch's min-cut partitioner decides what the forward saves and what the backward recomputes.
Forward graph: ``primals -> (*outputs, *saved_tensors, *saved_symints)``; backward graph:
``(*saved, *tangents) -> clipped grads`` (the exact order of the saved values is read from the
placeholders of the backward graph).
"""

from __future__ import annotations

from fx_bk._torch_internals import partition_joint_graph

from .program import BKProgram


def partition_joint(prog: BKProgram) -> None:
    prog.fw_graph, prog.bw_graph = partition_joint_graph(
        prog.joint_graph, num_fwd_outputs=prog.num_outputs
    )


LOGGED_GRAPHS = ("fw_graph", "bw_graph")


def summarize(prog: BKProgram) -> str:
    inputs = sum(1 for n in prog.bw_graph.graph.nodes if n.op == "placeholder")
    return (f"forward {len(prog.fw_graph.graph.nodes)} nodes, backward "
            f"{len(prog.bw_graph.graph.nodes)} nodes with {inputs} inputs")
