"""The module ``fx_bk.transform`` returns, and the autograd.Function that runs the BK graphs.

NOTE [lazy build under torch.compile]: the graphs depend on the inputs' non-batch shapes, which
are only known at the first call, and that call may already be inside ``torch.compile``'s
tracing. ``BKModule.forward`` therefore calls ``bk_graph_call``, which Dynamo keeps in the graph
(``allow_in_graph``); it receives only tensors plus constants: the module's id, the inputs'
*layout* (a tuple of constants) and the train/eval flag. Inside it, the traced programs are
looked up by signature or built outside any enclosing tracing (``escape_outer_tracing``); then
``BKFunction.apply`` runs them, and AOTAutograd traces through it, so Inductor sees plain aten
ops of the forward and BK backward.

NOTE [stale traces]: a program is a trace of the wrapped module as it was when it was built.
``program_for`` keys programs on ``module_signature(module)`` (submodules, their plain
attributes, hooks, parameter shapes and dtypes): in eager mode it runs at every call, so a
change gives a fresh trace. Under torch.compile the compiled graph runs without Python and
``program_for`` runs only while Dynamo traces: Dynamo's guards on what ``forward`` reads (the
module tree walked by ``named_parameters``, parameter metadata) recompile on a replaced
submodule or parameter, which reaches ``program_for`` and a fresh trace; a plain attribute or
a hook changed after compiling is not guarded, so the compiled graph checks the signature at
every call and raises (``fx_bk/change_guard.py``; ``torch.compiler.reset()`` after a change).

NOTE [dynamic lengths]: a program is traced with the batch as a symbol and, for the dims in
``InputMeta.dynamic``, further symbols (a sequence length). Which dims: those declared with
``transform(..., dynamic={...})`` or with Dynamo's ``mark_dynamic``, those Dynamo passes as
symbols under torch.compile, and, as Dynamo's automatic dynamic shapes, any dim whose size
differs from the previous call's with the same structure (``batch_inputs.DynamicDims``): the
first size gets a static trace, the second a symbolic one that serves every later size. Dims
of equal size in a call share a symbol; the program key holds the symbols' names, so a call
where they differ gets its own trace. The trace's conditions on the sizes (``SizeGuard``: a
branch on the length, a length pinned by a reshape, a rule's condition) are re-checked per
call by ``SizeRegions`` (under torch.compile the check is a Dynamo guard). A forward that
cannot be traced symbolically is traced per size from then on, with a warning.

NOTE [autocast]: a program is traced for one autocast state (enabled and dtype per device type
of the params and inputs; ``fx_bk/autocast.py``), which is part of its cache key: the same module
called with and without autocast builds two programs. Under torch.compile the key is read while
AOTAutograd traces, and Dynamo's global-state guard (it includes the autocast state) makes a call
under another state recompile, which reaches ``program_for`` again. The fw/bw graphs hold their
casts explicitly, so ``BKFunction`` runs them with autocast off (a backward called inside
autocast does not recast the float32 clipping).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
import weakref
from collections import OrderedDict

import torch

from passes import BKProgram, run_passes

from . import autocast as amp
from . import change_guard, precision_guard
from ._torch_internals import (
    disable_proxy_modes_tracing,
    escape_outer_tracing,
    is_fake,
)
from .batch_inputs import (
    BatchHistory,
    DynamicDims,
    SizeRegions,
    batch_free_signature,
    leaf_arguments,
)
from .bk_function import BKFunction, CompiledProgram
from .config import BKConfig
from .deferred_error import Rejected
from .distributed import check_not_sharded
from .empty_batch import EmptyBatch, empty_outputs
from .errors import FxBkError, UnsupportedModelError
from .layout import flatten, unflatten
from .module_state import module_signature, wrapped_attribute
from .step_guard import collect_norms, forget, last_norms, nonfinite_count, register, take_norms


class BKModule(torch.nn.Module):
    """Wraps ``module``; ``loss.backward()`` leaves ``sum_i C_i grad l_i`` in every ``p.grad``.

    Shares the wrapped module's Parameter objects, so an optimizer built on either works.
    """

    def __init__(self, module: torch.nn.Module, config: BKConfig):
        super().__init__()
        self._module = module
        self.bk_config = config
        self._bounds = config.group_bounds
        # on the module's device (a model moved to the GPU before transform): a graph input
        # that Inductor's GPU kernels read
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        self.register_buffer("clip_bounds", torch.tensor(
            self._bounds, dtype=torch.float64, device=None if first is None else first.device),
            persistent=False)
        self._register()

    def set_clip_bounds(self, bounds) -> None:
        """Clip with new bounds from the next backward on (adaptive clipping): one positive
        number, or one per clipping group. The bounds are an input of the compiled graphs, so
        this needs no new trace or compile; the DP optimizer's noise must follow them
        (``fx_bk.PrivacyEngine`` does)."""
        groups = self.bk_config.clip_groups
        if isinstance(bounds, (list, tuple)):
            bounds = tuple(bounds) if groups is not None or len(bounds) != 1 else bounds[0]
        values = BKConfig(max_grad_norm=bounds, clip_groups=groups).group_bounds
        self._bounds = values
        with torch.no_grad():
            self.clip_bounds.copy_(torch.tensor(values, dtype=torch.float64))

    @property
    def current_clip_bounds(self) -> tuple[float, ...]:
        """The bound of each clipping group the next backward clips with."""
        return self._bounds

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the bounds; a dtype cast (``.half()``, ``.to(bfloat16)``) would
        round them (a larger bound than the noise is calibrated to): they stay float64."""
        super()._apply(fn, recurse)
        self.clip_bounds = torch.tensor(self._bounds, dtype=torch.float64,
                                        device=self.clip_bounds.device)
        return self

    def _register(self) -> None:
        """A fresh id (the key of the traced programs and the recorded norms) and no programs."""
        self._regions: OrderedDict = OrderedDict()  # input signature -> SizeRegions, LRU
        self._output_layouts: dict = {}  # (input layout, training) -> output layout, last used
        self._warned_eviction = False
        self._batch_history = BatchHistory()
        self._dynamic = DynamicDims(self.bk_config.automatic_dynamic)
        self._leaf_names: dict = {}  # input layout -> forward argument of each tensor leaf
        self._bk_id = next(_ids)
        register(self._bk_id)
        weakref.finalize(self, forget, self._bk_id)
        _MODULES[self._bk_id] = self

    def __getstate__(self):
        """Copies (``copy.deepcopy``, ``pickle``, ``torch.save``) leave the traced programs
        behind: they hold fake tensors and graphs of the original's parameters. A copy traces
        its own at its first call."""
        state = super().__getstate__()
        for key in ("_regions", "_output_layouts", "_bk_id", "_warned_eviction",
                    "_batch_history", "_leaf_names", "_dynamic"):
            state.pop(key, None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._register()

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the wrapped module (a HF ``config``)."""
        return wrapped_attribute(self, name, "_module")

    def forward(self, *args, **kwargs):
        """Same call signature as the wrapped module's forward. Without grad mode
        (``torch.no_grad()``, ``torch.inference_mode()``: evaluation) it is the plain forward:
        no gradient, so nothing to clip and no BK program to build."""
        if not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        params = [p for _, p in self._module.named_parameters()]
        buffers = [b for _, b in self._module.named_buffers()]
        leaves: list = []
        layout = flatten((args, kwargs), leaves)
        if _batch_size(leaves) == 0:
            return self._empty_batch_forward(args, kwargs)
        training = self._module.training
        bounds = self.clip_bounds
        if params and bounds.device != params[0].device:  # the wrapped module moved by itself
            bounds = bounds.to(params[0].device)
        flat_out = bk_graph_call(
            self._bk_id, layout, training, len(params), len(buffers), bounds,
            *params, *buffers, *leaves
        )
        out, _ = unflatten(self._output_layouts[(layout, training)], flat_out)
        return out

    def _empty_batch_forward(self, args, kwargs):
        """Poisson sampling yields empty batches: no sample, so the clipped sum is exactly zero
        (the optimizer then adds only noise). The plain forward gives the output shapes; the
        backward gives zero gradients whatever the loss (a mean over nothing is NaN)."""
        trainable = [p for p in self._module.parameters() if p.requires_grad]
        with torch.no_grad():
            out = empty_outputs(self._module, args, kwargs)
        leaves: list = []
        layout = flatten(out, leaves, outputs=True)
        floats = [i for i, t in enumerate(leaves) if t.is_floating_point()]
        k = 1 if self.bk_config.clip_groups is None else len(self.bk_config.clip_groups)
        connected = EmptyBatch.apply(self._bk_id, k, len(trainable), *trainable,
                                      *[leaves[i] for i in floats])
        for i, t in zip(floats, connected):
            leaves[i] = t
        return unflatten(layout, leaves)[0]

    def program_for(self, layout, training, params, buffers, inputs) -> CompiledProgram:
        """Look up or build the BK program for these inputs (batch size excluded) and the
        wrapped module as it is now (NOTE [stale traces])."""
        module = self._module
        check_not_sharded(module, params)  # FSDP inside the wrapped model: fx_bk/distributed.py
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            raise FxBkError(
                "fx_bk: an input of the model requires grad; fx_bk computes gradients of the "
                "model's parameters only. Wrap the whole trainable model with fx_bk.transform, "
                "or detach the input"
            )
        with disable_proxy_modes_tracing():
            names = self._leaf_arguments(layout, len(inputs))
            declared = tuple(n in self.bk_config.unbatched for n in names)
            trainable = tuple(p.requires_grad for p in params)
            autocast = amp.current_state(amp.device_types([*params, *inputs]))
            traced = any(is_fake(x) for x in [*inputs, *params])  # torch.compile's trace
            base = (layout, training, module_signature(module), trainable, autocast, traced)
            batch, metas, sizes = self._dynamic.metas(
                base, inputs, declared, self._requested_dims(layout, inputs))
            self._batch_history.check(names, metas, batch)
            region = self._region((*base, batch_free_signature(metas)))
            found = region.lookup(sizes)
        if found is not None:
            self._output_layouts[(layout, training)] = found.prog.output_layout
            return found
        _check_call_signature(module, layout, inputs)
        try:
            compiled = self._build(layout, training, trainable, autocast, params, inputs, metas,
                                   traced)
        except Exception as e:
            if not any(m.dynamic for m in metas):
                raise
            # NOTE [dynamic lengths]: a forward that cannot be traced with a symbolic length
            # is traced per length, as before; the error that made it so is in the warning
            self._dynamic.give_up(base)
            problems = getattr(e, "problems", None)
            first = str(problems[0]) if problems else \
                (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(
                f"fx_bk: {type(module).__name__} could not be traced with a symbolic sequence "
                f"length ({type(e).__name__}: {first[:400]}); each length gets a trace of its "
                f"own. Pass dynamic=False to fx_bk.transform to silence this", stacklevel=4)
            return self.program_for(layout, training, params, buffers, inputs)
        if isinstance(compiled, Rejected):
            return compiled
        region.add(compiled, compiled.prog.size_guards, compiled.prog.trace_sizes)
        with disable_proxy_modes_tracing():
            found = region.lookup(sizes)
        if found is None:
            raise FxBkError(
                f"fx_bk: the model's forward depends on the batch size or a dynamic length in "
                f"a way that cannot be traced for sizes {sizes} (conditions: "
                f"{[str(g.expr) for g in compiled.prog.size_guards]}); avoid code that "
                f"branches on them"
            )
        return found

    def _build(self, layout, training, trainable, autocast, params, inputs, metas, traced):
        """Trace and build the program for one call (NOTE [lazy build under torch.compile]);
        ``traced``: torch.compile traces it (fake tensors)."""
        module = self._module
        real = not traced
        with escape_outer_tracing():
            prog = BKProgram(
                model=module, config=self.bk_config,
                param_names=[n for n, _ in module.named_parameters()],
                trainable=list(trainable),
                buffer_names=[n for n, _ in module.named_buffers()],
                input_layout=layout, inputs=metas,
                example_inputs=[x.detach() for x in inputs] if real else None,
                record_key=self._bk_id, autocast=autocast, for_inductor=not real,
            )
            try:
                run_passes(prog)
            except UnsupportedModelError as e:
                if real or prog.forward_graph is None or not any(m.batched for m in metas) \
                        or any(m.dynamic for m in metas):
                    raise
                self._output_layouts[(layout, training)] = prog.output_layout
                return Rejected(prog, e)  # raised at run time (fx_bk/deferred_error.py)
            prog.example_inputs = None
            precision_guard.register(self._bk_id, type(module).__name__, prog.sites)
            compiled = CompiledProgram(prog)
        self._output_layouts[(layout, training)] = prog.output_layout
        return compiled

    def _requested_dims(self, layout, inputs) -> frozenset:
        """The (input, dim) pairs ``transform(..., dynamic={...})`` declared."""
        names = self._leaf_arguments(layout, len(inputs))
        declared = dict(self.bk_config.dynamic_dims)
        return frozenset((i, d) for i, n in enumerate(names) for d in declared.get(n, ())
                         if d < inputs[i].dim())

    def _leaf_arguments(self, layout, n: int) -> tuple[str, ...]:
        if layout not in self._leaf_names:
            self._leaf_names[layout] = leaf_arguments(self._module, layout, n)
        return self._leaf_names[layout]

    def _region(self, key) -> SizeRegions:
        """The programs of one input signature; beyond ``MAX_SIGNATURES`` the least recently
        used signature's programs are dropped (a warning says so, once)."""
        if key in self._regions:
            self._regions.move_to_end(key)
            return self._regions[key]
        region = self._regions[key] = SizeRegions()
        if len(self._regions) > MAX_SIGNATURES:
            self._regions.popitem(last=False)
            if not self._warned_eviction:
                self._warned_eviction = True
                warnings.warn(
                    f"fx_bk: {type(self._module).__name__} was called with more than "
                    f"{MAX_SIGNATURES} input signatures (static shapes other than the batch "
                    f"size, dtypes, train/eval, autocast); each traces its own BK program, and "
                    f"the least recently used are dropped. Let sizes that vary be symbolic "
                    f"(fx_bk.transform's dynamic) or pad inputs to a few fixed lengths",
                    stacklevel=4,
                )
        return region

    @property
    def last_per_sample_norms(self) -> torch.Tensor | None:
        """The per-sample gradient norms of the last backward, before clipping: ``[B]`` for
        all-layer clipping, ``[B, K]`` with clipping groups (``bk_config.clip_groups`` order).
        ``None`` before the first backward. For monitoring and adaptive clipping; note that
        releasing statistics of unclipped norms is not covered by the DP guarantee."""
        norms = last_norms(self._bk_id)
        if norms is None or self.bk_config.clip_groups is not None:
            return norms
        return norms[:, 0]

    def collect_per_sample_norms(self) -> None:
        """From now on keep the per-sample norms of every backward (all micro-batches of a
        step), until ``take_per_sample_norms``: what adaptive clipping counts."""
        collect_norms(self._bk_id)

    def take_per_sample_norms(self) -> torch.Tensor | None:
        """The norms ``[N, K]`` of every backward since the last call (None: none ran)."""
        return take_norms(self._bk_id)

    @property
    def nonfinite_samples(self) -> int:
        """How many samples were skipped so far for a NaN or infinite gradient norm."""
        return nonfinite_count(self._bk_id)

    @property
    def programs(self) -> list[CompiledProgram]:
        """Every BK program built so far (one per input signature and batch-size region)."""
        return [p for r in self._regions.values() for p in r.programs.values()]


def _batch_size(leaves: list):
    return next((x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0), None)


def _check_call_signature(module: torch.nn.Module, layout, inputs) -> None:
    (args, kwargs), _ = unflatten(layout, inputs)
    try:
        inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(module).__name__}.forward() called through fx_bk: {e}") from None


MAX_SIGNATURES = 16  # input signatures whose BK programs a module keeps (LRU)
_MODULES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ids = itertools.count()


@torch.compiler.allow_in_graph
def bk_graph_call(module_id, layout, training, n_params, n_buffers, bounds, *flat):
    """The one call torch.compile keeps opaque (see NOTE [lazy build under torch.compile]).

    ``module_id`` is a constant of the Dynamo graph, so two fx_bk modules never share a compiled
    graph (a per-module closure would: Dynamo does not guard on closure identity).
    """
    module = _MODULES[module_id]
    params = list(flat[:n_params])
    buffers = list(flat[n_params : n_params + n_buffers])
    inputs = list(flat[n_params + n_buffers :])
    compiled = module.program_for(layout, training, params, buffers, inputs)
    if inputs and is_fake(inputs[0]):  # torch.compile traces this call: see change_guard
        torch.ops.fx_bk.check_unchanged(inputs[0], change_guard.record(module._module))
    if isinstance(compiled, Rejected):
        return tuple(compiled.outputs(inputs))
    return BKFunction.apply(compiled, *params, *buffers, *inputs, bounds)
