"""Pass 8: trace the joint graph: forward, output gradients, per-sample norms, clipped grads.

``joint(primals, tangents) -> (*outputs, *clipped_grads)`` where ``primals`` are the forward
graph's inputs (params, buffers, tensor inputs) followed by the clipping bounds ``[K]``
(float64, ``BKModule.clip_bounds``: a graph input, so a changed bound needs no new trace) and
``tangents`` the gradients of the float outputs. The forward also draws a step token that the
backward's one-clip-per-step check reads (``fx_bk/step_guard.py``). Inside, the parameters
are fresh leaves that require grad and ``torch.autograd.grad`` is taken w.r.t. the site
outputs only: autograd never builds an unclipped weight-gradient matmul.
The whole function is traced by ``make_fx`` with the symbolic batch, so the result is one aten
graph for every batch size. Functionalization (in-place ops rewritten, as the partitioner
needs) is applied only where there is something to rewrite: when the forward graph updates a
tensor in place, or when the plain trace meets an in-place op (dropout's ``bernoulli_`` in
training, a rule's or a backward formula's), where it stops and the joint is traced again
functionalized. A trace without in-place ops is already functional, and the functionalizing
tensor wrapper doubled the trace's time (measured: MLP 1.2 -> 0.7 s, encoder 3.8 -> 2.4 s,
GPT-2 3.5 -> 1.6 s on 2 CPU threads; the same ops recorded).

Mixed precision: the forward runs under the program's autocast state (``prog.autocast``), so
this trace records its casts; everything after it runs with autocast off. The norms and clip
factors are computed on float32 copies of the site tensors (:func:`site_values`; float64 stays
float64); a rule's instantiated per-sample gradients may come from the tensors in the autocast
dtype (convolutions: AMP's weight-gradient kernel), widened before their norms and sum, and the
clipped sums are returned in each parameter's dtype.
"""

from __future__ import annotations

import torch

from fx_bk._torch_internals import (
    functionalize,
    joint_trace_shims,
    make_fx,
    mutating_ops,
    set_flat_codegen,
    stop_at_in_place_ops,
)
from fx_bk.autocast import disabled, entered
from fx_bk.backward_decompositions import BACKWARD_DECOMPOSITIONS
from fx_bk.clipping import clipped_gradients
from fx_bk.errors import FxBkError, Problem, UnsupportedModelError, raise_if_any
from fx_bk.rules import accumulation_dtype
from fx_bk.rules.derived import DerivedBundle
from fx_bk.site import Site, SiteValues
from fx_bk.step_guard import record_norms, step_token

from .program import BKProgram
from .trace_model import size_guards


def output_vals(prog: BKProgram) -> list:
    out = prog.forward_graph.graph.output_node().args[0]
    return [n.meta.get("val") if isinstance(n, torch.fx.Node) else n for n in out]


def build_joint(prog: BKProgram) -> None:
    vals = output_vals(prog)[: prog.num_outputs]
    prog.differentiable_outputs = [
        isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in vals
    ]
    with prog.mode.fake_mode:
        tangents = [
            torch.empty(v.shape, dtype=v.dtype, device=v.device)
            for v, d in zip(vals, prog.differentiable_outputs) if d
        ]
        bounds = torch.empty(len(prog.config.group_bounds), dtype=torch.float64,
                             device=prog.fake_inputs[_bounds_device_source(prog)].device)
    joint = make_joint_function(prog)
    try:
        with prog.mode.fake_mode:
            gm = _plain_trace(prog, joint, bounds, tangents)
            if gm is None:
                gm = make_fx(functionalize(joint), decomposition_table=_decompositions(prog))(
                    [*prog.fake_inputs, bounds], tangents)
    except RuntimeError as e:  # vmap refuses an op of a parameter-only chain
        derived = _instantiated_derivations(prog)
        if not derived:
            raise
        raise _derivations_failed(derived, f"which failed: {str(e).strip().splitlines()[0]}") \
            from e
    _name_placeholders(gm, len(prog.fake_inputs) + 1)
    if prog.mode.specialized_batch() is not None:
        fallback = [s for s in prog.sites if s.rule.fallback]
        if fallback:
            raise UnsupportedModelError([Problem(
                "unsupported-op",
                f"op {s.op} (site {s.node}, parameters {sorted(s.params.values())}) has no "
                f"dedicated per-sample rule, and the vmap(vjp) fallback tried for it (or for "
                f"another fallback site) specializes the batch size; freeze its parameters or "
                f"express the layer with a supported op",
            ) for s in fallback])
        derived = _instantiated_derivations(prog)
        if derived:
            raise _derivations_failed(derived, "and an op of that chain (or another such "
                                               "chain) specializes the batch size under vmap")
        raise FxBkError(
            "fx_bk internal error: a per-sample rule specialized the batch size while tracing "
            "the joint graph; please report this with the model"
        )
    guards, problems = size_guards(prog)  # the rules' conditions on a dynamic length too
    raise_if_any(problems)
    prog.size_guards = guards
    prog.joint_graph = gm


def _plain_trace(prog: BKProgram, joint, bounds, tangents) -> torch.fx.GraphModule | None:
    """The joint graph traced without functionalization, or None where it would hold an
    in-place op: the forward graph has one, or the trace meets one (stopped there: dropout's
    ``bernoulli_`` in training is one, early in the forward) or recorded one. The plain trace
    only saves time: whatever else stops it (an op the stopping mode cannot pass, such as a
    higher-order op without a rule for it, or the model's own error) is left to the
    functionalized trace, which raises it as it did before."""
    if mutating_ops(prog.forward_graph):
        return None
    try:
        gm = make_fx(stop_at_in_place_ops(joint), decomposition_table=_decompositions(prog))(
            [*prog.fake_inputs, bounds], tangents)
    except Exception:  # InPlaceOpTraced, or anything else: traced again functionalized
        return None
    return None if mutating_ops(gm) else gm


def _decompositions(prog: BKProgram) -> dict:
    """Backward ops the joint trace decomposes: for Inductor only (it fuses the pieces; eager
    runs ATen's fused kernels faster than the pieces, measured 1.66x -> 1.85x of non-private
    on the benchmark CNN's eager step)."""
    return BACKWARD_DECOMPOSITIONS if prog.for_inductor else {}


def _bounds_device_source(prog: BKProgram) -> int:
    """The primal whose device the clipping bounds share: the first trainable parameter's (the
    module's buffer moves with its parameters), else the first batched input's."""
    return next((i for i, t in enumerate(prog.trainable) if t), prog.first_batched_input())


def _instantiated_derivations(prog: BKProgram) -> list:
    """The derived values whose per-sample gradients go through ``vmap(vjp)``."""
    return [d for b in prog.bundles if isinstance(b.handler, DerivedBundle)
            and not b.handler.isometric for d in b.handler.derivation.values]


def _derivations_failed(derived: list, why: str) -> UnsupportedModelError:
    """The error for derived values whose ``vmap(vjp)`` cannot be traced (``why``)."""
    return UnsupportedModelError([Problem(
        "unsupported-op",
        f"the per-sample gradients of {d.name} (computed from parameters {list(d.sources)} by "
        f"{' -> '.join(d.chain)}) are mapped back by vmap(vjp), {why}. Freeze those parameters "
        f"or apply them to the batch directly",
    ) for d in derived])


def _name_placeholders(gm: torch.fx.GraphModule, num_primals: int) -> None:
    """Flat ``primals_i`` / ``tangents_i`` placeholders, the names the partitioner expects."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        kind, k = ("primals", i + 1) if i < num_primals else ("tangents", i - num_primals + 1)
        node.name = node.target = f"{kind}_{k}"
    set_flat_codegen(gm)


def make_joint_function(prog: BKProgram):
    gm = prog.forward_graph
    n_p, n_out = len(prog.param_names), prog.num_outputs
    trainable = prog.trainable
    batched_input = prog.first_batched_input()
    diff = prog.differentiable_outputs
    reached = {n for s in prog.sites for p in s.params.values() for n in prog.sources_of(p)}
    graded = [n for n in prog.trainable_names if n in reached]

    def joint(primals, tangents):
        with disabled(prog.autocast), joint_trace_shims():
            return bk_step(primals, tangents)

    def bk_step(primals, tangents):
        *primals, bounds = primals
        for i in range(n_p):
            if trainable[i]:
                primals[i] = primals[i].detach().requires_grad_()
        token = step_token(primals[batched_input], prog.record_key)  # this forward call's
        with torch.enable_grad(), entered(prog.autocast):
            flat = gm(*primals)
        outs, aux = flat[:n_out], flat[n_out:]
        pairs = [(o, t) for o, t in zip([o for o, d in zip(outs, diff) if d], tangents)
                 if o.requires_grad]
        site_outs = [aux[s.aux["out"]] for s in prog.sites]
        grads_out = torch.autograd.grad(
            [o for o, _ in pairs], site_outs, [t for _, t in pairs],
            allow_unused=True, materialize_grads=True,
        ) if pairs else [torch.zeros_like(s) for s in site_outs]
        batch = primals[batched_input].shape[0]
        values = [site_values(s, aux, o, g, batch)
                  for s, o, g in zip(prog.sites, site_outs, grads_out)]
        bundles = [([values[i] for i in b.sites], _bound(b.handler, primals), b.clip_group)
                   for b in prog.bundles]
        grads, norms = clipped_gradients(bundles, prog.config, batch, bounds)
        param_of = dict(zip(prog.param_names, primals[:n_p]))
        grads = [grads[n].to(param_of[n].dtype) for n in graded]
        if grads:  # the recorder's zero keeps it live (see fx_bk/step_guard.py); added to the
            # smallest gradient: on a weight, Inductor turns it into an addmm bias + a copy
            k = min(range(len(grads)), key=lambda i: grads[i].numel())
            done = record_norms(norms, prog.record_key, token,
                                prog.config.nonfinite == "raise")
            grads[k] = grads[k] + done.to(grads[k].dtype)
        return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs] + grads

    prog.graded_params = graded
    return joint


def _bound(handler, primals):
    """A derived-value handler gets the tensors its parameter-only ops read."""
    if isinstance(handler, DerivedBundle):
        return handler.bind([primals[k] for k in handler.derivation.inputs])
    return handler


def site_values(site: Site, aux: list, out: torch.Tensor, grad: torch.Tensor,
                batch) -> SiteValues:
    """The site's activations and output gradient in float32 at least (float16/bfloat16 under
    autocast: the norms and clip factors are computed in float32), and under autocast also in
    the op's dtype (``SiteValues.computed``: the operands of a rule's clipped GEMM).

    A floating activation is first rounded to the dtype the op computed in (its output's: a
    Linear under bf16 autocast multiplies ``a.bfloat16()``), so the per-sample gradients are
    those of the computation that ran; integer activations (embedding indices) are untouched.
    """
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.to(accumulation_dtype(t))

    narrow = out.is_floating_point() and accumulation_dtype(out) != out.dtype
    tensors, computed = {}, {}
    for role, i in site.aux.items():
        t = aux[i]
        if role == "out":
            continue
        floating = t.is_floating_point() and out.is_floating_point()
        if floating and out.dtype.itemsize < t.dtype.itemsize:
            t = t.to(out.dtype)
        if role not in site.params:
            t = _batch_first(t, site, batch)
        if floating and narrow and t.dtype == out.dtype:
            computed[role] = t
        tensors[role] = wide(t) if floating else t
    g = _batch_first(grad.detach(), site, batch)
    if narrow:
        computed["grad"] = g
    rows = batch * site.row_group  # a row group: the rule's samples are the rows
    return SiteValues(site, tensors, wide(g), rows, out.dtype if narrow else None, computed)


def _batch_first(t: torch.Tensor, site: Site, batch) -> torch.Tensor:
    """A batched site tensor in ``site.batch_layout`` (see ``find_sites._unfold_batch``) as
    ``[B, T, *rest]``; unchanged when the site is batch-first. A dynamic factor of the folded
    dim (``"T"``, at most one) is what remains of its size."""
    if site.batch_layout is None:
        return t
    prefix, k, n_lead = site.batch_layout
    sizes = [batch if d == "B" else -1 if d == "T" else d for d in prefix]  # "T": dynamic
    t = t.reshape(*sizes, *t.shape[n_lead:]).movedim(k, 0)
    return t.reshape(batch, -1, *t.shape[len(prefix):])


LOGGED_GRAPHS = ("joint_graph",)


def summarize(prog: BKProgram) -> str:
    return (f"joint graph {len(prog.joint_graph.graph.nodes)} nodes, clipped gradients of "
            f"{len(prog.graded_params)} parameters")
