"""Pass 3: prove, on the traced graph, that no sample's values depend on another sample.

BK's per-sample gradients are exact only if sample i's activations come from sample i alone and
the loss is a mean (or sum) of per-sample terms. Every value of the forward graph gets a batch
location (``passes/batch_locations.py``): shared, per-sample along a dim (possibly folded with
other dims, ``[B*T, d]``), a loss over the batch, or mixed. Each op is checked by its semantics
(reductions, contractions, slices, concatenations, normalizations along the batch mix samples);
an op the table does not know is proven on a probe: it runs on the forward's values at a small
batch, once per sample with that sample's inputs perturbed, and must change that sample's slice
of its output only. The proof runs on the trace with a symbolic batch size, so it holds for
every batch, eager and compiled alike.

Accepted: mixing that reaches no output, and outputs that are a loss over the batch whose kind
matches ``loss_reduction`` (a mean over the labels that are not ``ignore_index`` is a mean of
per-sample terms only when every sample has as many labels: ``fx_bk::check_labelled_mean``,
inserted next to the loss, checks that on every call). Rejected, naming the op and the source
line: every other value that mixes samples and reaches an output or a trainable op.
"""

from __future__ import annotations

import sympy
import torch

import fx_bk.losses  # noqa: F401  (registers fx_bk::check_labelled_mean)
from fx_bk._torch_internals import is_op_overload, normalize_call
from fx_bk.autocast import entered
from fx_bk.errors import Problem

from .batch_locations import PROBE, SHARED, Context, Loss, Mixed, Sample, Shared, transfer
from .describe import op_name, report_mixing, where
from .program import BKProgram

aten = torch.ops.aten


def prove_sample_independence(prog: BKProgram) -> None:
    if any(p.kind in ("batch-size-specialized", "no-batch-input") for p in prog.problems):
        return
    gm = prog.forward_graph
    ctx = Context(prog.mode.batch_symbol)
    locs: dict[torch.fx.Node, object] = {}
    probe = _Probe(prog)
    n_state = len(prog.param_names) + len(prog.buffer_names)
    for i, node in enumerate(prog.placeholders()):
        meta = prog.inputs[i - n_state] if i >= n_state else None
        locs[node] = Sample(0) if meta is not None and meta.batched else SHARED
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            locs[node] = SHARED
            continue
        loc = transfer(node, locs.__getitem__, ctx)
        locs[node] = probe(node, locs, ctx) if loc is PROBE else loc
    prog.batch_locations = locs
    _report(prog, locs)


def _report(prog: BKProgram, locs) -> None:
    """Mixed values at the model's outputs, and losses of the wrong kind (a site's input is
    checked by ``find_sites``, which runs next)."""
    outputs = list(prog.forward_graph.graph.output_node().args[0])[: prog.num_outputs]
    for k, node in enumerate(outputs):
        loc = locs.get(node) if isinstance(node, torch.fx.Node) else SHARED
        if isinstance(loc, Mixed):
            report_mixing(prog, loc, f"output {k} of the model")
        elif isinstance(loc, Loss):
            _check_loss(prog, k, node, loc)


def _check_loss(prog: BKProgram, k: int, node, loss: Loss) -> None:
    what = f"output {k} (op {op_name(node)}{where(node)})"
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() != 1 or not val.dtype.is_floating_point:
        prog.problems.append(Problem(
            "mixes-samples",
            f"{what} is reduced over the batch but is not a scalar loss: return per-sample "
            f"values (batch dim first) and reduce them in the loss",
        ))
        return
    want = prog.config.loss_reduction
    kind = loss.reduction
    if kind != want:
        prog.problems.append(Problem(
            "loss-not-per-sample",
            f"{what} is the {kind} over the batch of per-sample losses, but fx_bk was told "
            f"loss_reduction={want!r}: pass loss_reduction={kind!r} to fx_bk.transform",
        ))
    for op in loss.guards:
        _guard_labelled_mean(prog, op)


def _guard_labelled_mean(prog: BKProgram, op: torch.fx.Node) -> None:
    """Insert ``fx_bk::check_labelled_mean`` on the targets of loss op ``op`` (once)."""
    if op.name in prog.labelled_losses:
        return
    prog.labelled_losses.append(op.name)
    args = normalize_call(op.target, op.args, op.kwargs)
    target = args["target"]
    loc = prog.batch_locations[target]
    outer, fold = (int(f) if sympy.sympify(f).is_number else -1 for f in (loc.outer, loc.fold))
    if outer == fold == -1:  # two dynamic lengths around the batch: not checkable per call
        prog.problems.append(Problem("loss-not-per-sample", (
            f"loss {op_name(op)}{where(op)} is a mean over labelled entries whose targets fold "
            f"the batch between two dynamic lengths; compute a per-sample loss "
            f"(fx_bk.sequence_cross_entropy(logits, labels).mean())")))
        return
    graph = prog.forward_graph.graph
    batched = prog.placeholders()[prog.first_batched_input()]
    with graph.inserting_after(op):
        batch = graph.call_function(torch.ops.aten.sym_size.int, (batched, 0))
    spec = (args.get("ignore_index", -100), outer, fold, batch)
    with graph.inserting_after(batch):
        check = graph.call_function(torch.ops.fx_bk.check_labelled_mean.default,
                                    (target, *spec))
    batch.meta["val"] = batched.meta["val"].shape[0]
    with prog.mode.fake_mode:
        check.meta["val"] = torch.ops.fx_bk.check_labelled_mean.default(
            target.meta["val"], *spec[:3], batch.meta["val"])
    prog.forward_graph.recompile()


PROBE_BATCH = 3


def _probe_batch(prog: BKProgram) -> list[torch.Tensor]:
    """The model's inputs at batch ``PROBE_BATCH``: the first call's samples where real (their
    integer ids are valid), made up from the input metadata otherwise."""
    real = prog.example_inputs
    out = []
    gen = torch.Generator().manual_seed(0)
    for i, m in enumerate(prog.inputs):
        x = real[i] if real is not None else None
        if not m.batched:
            out.append(x if x is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device))
            continue
        if x is not None:
            reps = -(-PROBE_BATCH // x.shape[0])
            x = x[:PROBE_BATCH].repeat(reps, *([1] * (x.dim() - 1)))[:PROBE_BATCH]
        else:
            shape = (PROBE_BATCH, *m.shape[1:])
            if m.dtype.is_floating_point or m.dtype.is_complex:
                x = torch.randn(shape, generator=gen).to(m.dtype)
            elif m.dtype == torch.bool:
                x = torch.ones(shape, dtype=torch.bool)
            else:
                x = torch.randint(0, 2, shape, generator=gen).to(m.dtype)
        out.append(x.to(m.device).clone())
    return out


def _leaves_state_alone(node: torch.fx.Node) -> bool:
    """Does running ``node`` leave the thread's global state (autocast, grad mode) as it was? An
    aten op or a Python operator does; a region's ``_enter_autocast``, say, does not."""
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    return node.op == "call_function" and (
        is_op_overload(node.target) or getattr(node.target, "__module__", None) == "_operator")


class _Recorder(torch.fx.Interpreter):
    """Runs the forward graph on the probe batch as far as it is asked to, and keeps a copy of
    every node's value. Only the ops before the last probed op run: the probed ops of a
    transformer (its mask's indexing) come first, and the rest of the forward (the language
    model head at its full vocabulary, say) would cost more than all the others. The run stops
    early only while every node run so far left the global state alone: once the graph has
    entered an autocast region (a ``forward`` wrapped in ``torch.autocast``, as accelerate does)
    it runs to its end, so the region is left within the same call."""

    def __init__(self, gm: torch.fx.GraphModule, args: list):
        super().__init__(gm)
        self.values: dict[torch.fx.Node, object] = {}
        self.failed: Exception | None = None
        self.env = {}
        self.args_iter = iter(args)
        self._nodes = list(gm.graph.nodes)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        self._next = 0
        self._last_stop = next(
            (i for i, n in enumerate(self._nodes) if not _leaves_state_alone(n)), len(self._nodes))

    def run_before(self, node: torch.fx.Node) -> None:
        """Every node before ``node`` run (or the run stopped at the first that raised:
        ``failed``); random ops draw from a fixed seed."""
        if self.failed is not None:
            return
        stop = self._index[node]
        if stop > self._last_stop:
            stop = len(self._nodes)
        entered_here: list[torch.fx.Node] = []
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(0)
                while self._next < stop:
                    n = self._nodes[self._next]
                    self._next += 1
                    out = self.env[n] = self.run_node(n)
                    self.values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
                    if isinstance(out, torch.autocast):
                        entered_here.append(n)
                    entered_here = [e for e in entered_here if e not in n.all_input_nodes]
                    for dead in self.user_to_last_uses.get(n, []):
                        del self.env[dead]
        except Exception as e:  # noqa: BLE001 - reported as the op's proof failing
            self.failed = e
            for region in reversed(entered_here):  # the regions the graph did not get to leave
                self.values[region].__exit__(None, None, None)


class _Probe:
    """Proves an op the table does not know, on the forward's values at a small batch, under
    the autocast state the forward was traced for."""

    def __init__(self, prog: BKProgram):
        self.prog = prog
        self.recorder: _Recorder | None = None

    def _start(self) -> _Recorder:
        prog = self.prog
        model = prog.model
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        state = [params[n].detach() for n in prog.param_names]
        state += [buffers[n].detach().clone() for n in prog.buffer_names]
        return _Recorder(prog.forward_graph, [*state, *_probe_batch(prog)])

    def __call__(self, node, locs, ctx):
        with entered(self.prog.autocast):
            if self.recorder is None:
                self.recorder = self._start()
            self.recorder.run_before(node)
            try:
                return _probe_op(node, locs, ctx, self.recorder.values)
            except Exception as e:  # noqa: BLE001
                why = self.recorder.failed or e
                return Mixed(node, f"is an op fx_bk has no rule for, and proving it on a probe "
                                   f"failed ({type(why).__name__}: {why}); express it with ops "
                                   f"fx_bk knows, or keep it outside the fx_bk module")


PROBE_SAMPLES = (0, 2)


def _probe_op(node, locs, ctx, values):
    def concrete(a):  # a node the probe did not reach raises: never the traced (symbolic)
        return values[a] if isinstance(a, torch.fx.Node) else a  # value, whose use adds guards

    def arg_map(fn):
        return torch.fx.node.map_aggregate((node.args, node.kwargs), fn)

    def call(args, kwargs):  # one seed for every call: a random op draws the same numbers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _as_list(node.target(*args, **kwargs))

    base = call(*arg_map(concrete))
    metas = _as_list(node.meta.get("val"))
    diffs: list[dict[int, torch.Tensor]] = [{} for _ in base]  # output -> sample -> changed
    batch = None
    for j in PROBE_SAMPLES:
        changed_any = False

        def perturbed(a, j=j):
            nonlocal changed_any, batch
            v = concrete(a)
            lo = locs.get(a) if isinstance(a, torch.fx.Node) else None
            if not isinstance(lo, Sample) or lo.iota or not isinstance(v, torch.Tensor):
                return v
            batch = int(v.shape[lo.dim] // int(lo.fold * lo.outer))
            changed_any = True
            return _perturb(v, lo, j)

        args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), perturbed)
        if not changed_any:
            break
        for i, (b, o) in enumerate(zip(base, call(args, kwargs))):
            if isinstance(b, torch.Tensor):
                diffs[i][j] = _differs(b, o)
    final = []
    for b, per_sample, meta in zip(base, diffs, metas):
        if not isinstance(b, torch.Tensor):
            final.append(SHARED)
        elif any(bool(d.any()) for d in per_sample.values()):
            found = _locate(per_sample, meta, ctx, batch)
            if found is None:
                return Mixed(node, "is an op fx_bk has no rule for, and on a probe changing "
                                   "one sample's values changed another's")
            final.append(found)
        else:
            final.append(Shared(True))  # no sample moved it: shape-derived, treated as batchy
    return final if isinstance(node.meta.get("val"), (tuple, list)) else final[0]


def _as_list(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _perturb(v: torch.Tensor, lo: Sample, j: int) -> torch.Tensor:
    """``v`` with sample ``j``'s entries (located by ``lo``) changed."""
    out = v.clone()
    part = out.unflatten(lo.dim, (int(lo.outer), -1, int(lo.fold))).select(lo.dim + 1, j)
    if v.dtype.is_floating_point or v.dtype.is_complex:
        g = torch.Generator().manual_seed(17 + j)
        scale = 3.0 * (1.0 + float(v.abs().max()) if v.numel() else 1.0)
        part.add_((torch.randn(part.shape, generator=g) * scale).to(v.dtype))
    elif v.dtype == torch.bool:
        part.logical_not_()
    else:
        hi = int(v.max()) + 1 if v.numel() else 1
        part.copy_((part + 1) % max(hi, 2))
    return out


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape != b.shape:
        return torch.ones(a.shape, dtype=torch.bool)
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return ~torch.isclose(a, b, rtol=1e-6, atol=0, equal_nan=True)
    return a != b


def _locate(per_sample: dict, meta, ctx, batch) -> Sample | None:
    """One layout (dim, outer, fold) of the output under which perturbing sample ``j`` changed
    sample ``j``'s entries only, for every probed ``j``; None if there is none."""
    for d, size in enumerate(ctx.shape_of_val(meta) or ()):
        per_batch = ctx.fold_of(size)
        if per_batch is None or batch is None or not per_batch.is_integer:
            continue
        rows = {j: diff.movedim(d, 0).reshape(diff.shape[d], -1).any(1).nonzero().flatten()
                for j, diff in per_sample.items()}
        k = int(per_batch)
        for outer in (o for o in range(1, k + 1) if k % o == 0):  # size = outer * B * fold
            fold = k // outer
            if all(set(((r // fold) % batch).tolist()) <= {j} for j, r in rows.items()):
                return Sample(d, fold, outer=outer)
    return None


def summarize(prog: BKProgram) -> str:
    locs = getattr(prog, "batch_locations", {})
    kinds: dict[str, int] = {}
    for v in locs.values():
        kinds[type(v).__name__] = kinds.get(type(v).__name__, 0) + 1
    return f"batch locations {kinds}; {len(prog.problems)} problems in total"
