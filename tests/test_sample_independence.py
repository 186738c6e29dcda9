"""The static proof of sample independence (passes/prove_sample_independence.py).

Every way of coupling samples is rejected before the first step, eager and compiled, whatever
the first batch holds; every sample-wise model is accepted, and on it removing one sample moves
the clipped sum by at most R.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fx_bk
from fx_bk.testing import loop_clipped_sum, max_rel_err

R = 0.5


class Net(nn.Module):
    """Linear -> tanh -> ``mid`` -> Linear -> ``head``: coupling ops go in ``mid`` (activations
    of a trainable op) or ``head`` (the output, i.e. the gradient side)."""

    def __init__(self, mid=None, head=None, d=4, h=6, k=3):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, k)
        self.mid, self.head = mid or (lambda z: z), head or (lambda z: z)

    def forward(self, x):
        return self.head(self.l2(self.mid(torch.tanh(self.l1(x)))))


def _dominated_batch(n=5):
    """Sample 1 dominates every feature: a first-batch experiment perturbing sample 0 sees no
    change through ``amax(0)``."""
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    x[1] = 50.0
    return x


def _group_pool(z):
    gid = (z[:, :1] > 0).float()  # ids from the sample's own values
    same = (gid == gid.T).float()  # [B, B]: which samples share a group
    return same @ z / same.sum(1, keepdim=True)


# (name, mid, head): each couples samples; the first batch hides some of them
COUPLING = [
    ("last-row", lambda z: z - z[-1:], None),
    ("triangular-matmul", lambda z: torch.ones(z.shape[0], z.shape[0]).triu() @ z / z.shape[0],
     None),
    ("max-over-batch", lambda z: z / z.abs().amax(0), None),
    ("group-pooling", _group_pool, None),
    ("mean-over-batch", lambda z: z - z.mean(0), None),
    ("softmax-over-batch", lambda z: z.softmax(0), None),
    ("cumsum-over-batch", lambda z: z.cumsum(0), None),
    ("sort-over-batch", lambda z: z.sort(0).values, None),
    ("flip", lambda z: z.flip(0), None),
    ("roll", lambda z: z.roll(1, 0), None),
    ("cat-along-batch", lambda z: torch.cat([z[1:], z[:1]]), None),
    ("transposing-reshape", lambda z: z.reshape(z.shape[1], -1).reshape(z.shape[0], -1), None),
    ("position-scaling", lambda z: z * torch.arange(z.shape[0])[:, None], None),
    ("batch-size-scaling", lambda z: z / z.shape[0], None),
    ("pad-along-batch", lambda z: F.pad(z, (0, 0, 1, 0))[:-1], None),
    ("per-sample-conv-filters",  # filter j is sample j's: out_i = sum_j <z_i, z_j>
     lambda z: F.conv1d(z[:, :, None], z[:, :, None]).sum(1) * torch.ones(1, z.shape[1]), None),
    ("unbind-before-batch",  # pieces of [2, B, d/2]: b.sum(0) is over the batch
     lambda z: (lambda a, b: torch.cat([a + b.sum(0, keepdim=True), b], 1))(
         *z.reshape(z.shape[0], 2, -1).transpose(0, 1)), None),
    ("repeat-batch-shifted", lambda z: z.repeat(2, 1)[1:z.shape[0] + 1], None),
    ("output-centering", None, lambda o: o - o.mean(0)),
    ("output-batch-softmax", None, lambda o: o.softmax(0)),
    ("batch-statistics", None, lambda o: F.batch_norm(o, None, None, training=True)),
]
SAMPLEWISE = [
    ("identity", None, None),
    ("feature-softmax", lambda z: z.softmax(1), None),
    ("feature-cumsum", lambda z: z.cumsum(-1), None),
    ("feature-flip", lambda z: z.flip(1), None),
    ("reshape-roundtrip", lambda z: z.reshape(z.shape[0], 2, -1).transpose(1, 2)
     .reshape(z.shape[0], -1), None),
    ("arange-index", lambda z: z[torch.arange(z.shape[0])], None),
    ("per-sample-norm", lambda z: z / z.norm(dim=1, keepdim=True), None),
    ("uniform-mask", lambda z: z * torch.ones(z.shape[0], 1), None),
    ("repeated-constant-rows", lambda z: z + torch.arange(z.shape[1], dtype=z.dtype)[None]
     .repeat(z.shape[0], 1), None),
    ("unbind-before-batch", lambda z: torch.cat(
        z.reshape(z.shape[0], 2, -1).transpose(0, 1).unbind(0), 1), None),
]


def _loss(out, y):
    return F.cross_entropy(out, y)


def _step(model, x, y, compiled=False):
    bk = fx_bk.transform(model, max_grad_norm=R)
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    _loss(run(x), y).backward()


@pytest.mark.parametrize("name,mid,head", COUPLING, ids=[c[0] for c in COUPLING])
def test_coupling_is_rejected_naming_the_op(name, mid, head):
    torch.manual_seed(0)
    x, y = _dominated_batch(), torch.randint(0, 3, (5,))
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"mixes-samples.*op aten\.") as e:
        _step(Net(mid, head), x, y)
    assert "test_sample_independence.py" in str(e.value)  # the user's source line


@pytest.mark.parametrize("name,mid,head", COUPLING[:4] + COUPLING[-3:-1],
                         ids=[c[0] for c in COUPLING[:4] + COUPLING[-3:-1]])
def test_coupling_is_rejected_compiled_with_the_same_error_type(name, mid, head):
    torch.manual_seed(0)
    x, y = _dominated_batch(), torch.randint(0, 3, (5,))
    with pytest.raises(fx_bk.UnsupportedModelError) as e:
        _step(Net(mid, head), x, y, compiled=True)
    assert e.value.problems and e.value.problems[0].kind == "mixes-samples"


def _clipped_sum(model, x, y, bk=None):
    """The clipped sum of one step; ``bk``: a transform of ``model`` to reuse (one trace
    serves every batch size)."""
    model.zero_grad()
    bk = bk or fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    F.cross_entropy(bk(x), y, reduction="sum").backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name,mid,head", SAMPLEWISE, ids=[c[0] for c in SAMPLEWISE])
def test_samplewise_model_is_exact(name, mid, head):
    torch.manual_seed(0)
    model = Net(mid, head).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = _clipped_sum(model, x, y)
    want = loop_clipped_sum(model, (x, y), None, R, loss_of=lambda m, xy: F.cross_entropy(
        m(xy[0]), xy[1], reduction="sum"))
    want = torch.cat([want[n].flatten() for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


FAMILIES = [c[1] for c in COUPLING if c[1] is not None]  # forward side (activations)
HEADS = [c[2] for c in COUPLING if c[2] is not None]  # output / loss side (gradients)
SAFE = [c[1] for c in SAMPLEWISE if c[1] is not None]


def _random_model(safe_ops, coupling, where, batch):
    """Sample-wise ops in the given order with at most one coupling op: ``coupling`` indexes
    FAMILIES then HEADS (a head couples on the output side)."""
    ops = [SAFE[i] for i in safe_ops]
    head = None
    if coupling is not None and coupling < len(FAMILIES):
        ops.insert(min(where, len(ops)), FAMILIES[coupling])
    elif coupling is not None:
        head = HEADS[coupling - len(FAMILIES)]

    def mid(z):
        for op in ops:
            z = op(z)
        return z

    torch.manual_seed(batch)
    return Net(mid, head).double()


ARCHITECTURES = (st.lists(st.integers(0, len(SAFE) - 1), min_size=1, max_size=3),
                 st.one_of(st.none(), st.integers(0, len(FAMILIES) + len(HEADS) - 1)),
                 st.integers(0, 3), st.integers(2, 7))


@settings(max_examples=16, deadline=None, derandomize=True)
@given(*ARCHITECTURES)
def test_random_architectures(safe_ops, coupling, where, batch):
    """Coupled models are rejected; the others are accepted, and removing any one sample moves
    the clipped sum by at most R."""
    model = _random_model(safe_ops, coupling, where, batch)
    x = torch.randn(batch, 4, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (batch,))
    if coupling is not None:
        with pytest.raises(fx_bk.UnsupportedModelError, match="mixes-samples"):
            _clipped_sum(model, x, y)
        return
    bk = fx_bk.transform(model, max_grad_norm=R, loss_reduction="sum")
    full = _clipped_sum(model, x, y, bk)
    for i in range(batch):
        keep = [j for j in range(batch) if j != i]
        moved = (full - _clipped_sum(model, x[keep], y[keep], bk)).norm()
        assert moved <= R * (1 + 1e-6)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(*ARCHITECTURES)
def test_random_architectures_compiled(safe_ops, coupling, where, batch):
    """The same verdicts under torch.compile, with fx_bk's own exception type."""
    model = _random_model(safe_ops, coupling, where, batch).float()
    x, y = torch.randn(batch, 4) * 3, torch.randint(0, 3, (batch,))
    if coupling is not None:
        with pytest.raises(fx_bk.UnsupportedModelError, match="mixes-samples"):
            _step(model, x, y, compiled=True)
    else:
        _step(model, x, y, compiled=True)


@torch.library.custom_op("fx_bk_test::shift_batch", mutates_args=())
def shift_batch(x: torch.Tensor) -> torch.Tensor:
    return x.roll(1, 0)


@shift_batch.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("fx_bk_test::square", mutates_args=())
def square(x: torch.Tensor) -> torch.Tensor:
    return x * x


@square.register_fake
def _(x):
    return torch.empty_like(x)


def _square_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


square.register_autograd(lambda ctx, g: 2 * ctx.saved_tensors[0] * g,
                         setup_context=_square_setup)


def test_unknown_ops_are_proven_on_a_probe():
    """An op with no rule is run on a probe, sample by sample: a custom op that rolls the batch
    is rejected, an elementwise one accepted."""
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(fx_bk.UnsupportedModelError, match="fx_bk_test.shift_batch"):
        _step(Net(shift_batch), x, y)
    _step(Net(square), x, y)


@torch.library.custom_op("fx_bk_test::needs_four_samples", mutates_args=())
def needs_four_samples(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < 4:
        raise RuntimeError("needs at least four samples")
    return x * 2


@needs_four_samples.register_fake
def _(x):
    return torch.empty_like(x)


def test_the_probe_runs_the_forward_only_as_far_as_the_probed_op(monkeypatch):
    """The probe records the forward's values up to the op it proves, not the ops after it (a
    language model's head at its full vocabulary would cost more than the rest)."""
    prove = importlib.import_module("passes.prove_sample_independence")
    ran = []
    run_node = prove._Recorder.run_node
    monkeypatch.setattr(prove._Recorder, "run_node", lambda self, n: ran.append(n) or
                        run_node(self, n))
    bk = fx_bk.transform(Net(square), max_grad_norm=R)
    bk(torch.randn(4, 4))
    (compiled,) = bk.programs
    nodes = list(compiled.prog.forward_graph.graph.nodes)
    probed = next(n for n in nodes if n.target is torch.ops.fx_bk_test.square.default)
    assert ran == nodes[:nodes.index(probed)]


def test_an_op_that_fails_on_the_probe_is_rejected_with_the_reason():
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(fx_bk.UnsupportedModelError,
                       match="(?s)fx_bk_test.needs_four_samples.*proving it on a probe failed "
                             r"\(RuntimeError: needs at least four samples"):
        _step(Net(needs_four_samples), x, y)


class AutocastForward(Net):
    """``forward`` inside its own bf16 autocast region, as accelerate wraps a model's forward:
    the traced graph enters and leaves the region (``_enter_autocast`` / ``_exit_autocast``)."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(x).float()


@pytest.mark.parametrize("mid", [square, needs_four_samples], ids=["proven", "probe-fails"])
def test_the_probe_leaves_an_autocast_region_of_the_forward_closed(mid):
    """A forward graph that enters an autocast region runs to its end (or, where an op raises,
    has its open regions left): never a bf16 state leaking into the caller's float32 code."""
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    if mid is square:
        model = AutocastForward(square)
        _step(model, x, y)
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
    else:
        with pytest.raises(fx_bk.UnsupportedModelError, match="needs at least four samples"):
            _step(AutocastForward(needs_four_samples), x, y)
    assert not torch.is_autocast_enabled("cpu")
    assert torch.matmul(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.float32
    if mid is square:  # and the gradient is the clipped sum of the bf16 forward's
        ref = loop_clipped_sum(model, (x, y), None, R, loss_of=lambda m, xy: F.cross_entropy(
            m(xy[0]), xy[1], reduction="sum"))
        assert max_rel_err(got, ref) <= 3e-2


def test_loss_inside_the_model_must_be_a_mean_of_per_sample_terms():
    class WithLoss(Net):
        def __init__(self, reduce):
            super().__init__()
            self.reduce = reduce

        def forward(self, x, y):
            return self.reduce(super().forward(x), y)

    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    fx_bk.transform(WithLoss(lambda o, t: F.cross_entropy(o, t)), max_grad_norm=R)(x, y) \
        .backward()
    fx_bk.transform(WithLoss(lambda o, t: F.mse_loss(o, F.one_hot(t, 3).float())),
                    max_grad_norm=R)(x, y).backward()
    with pytest.raises(fx_bk.UnsupportedModelError, match="loss_reduction='sum'"):
        fx_bk.transform(WithLoss(lambda o, t: F.cross_entropy(o, t, reduction="sum")),
                        max_grad_norm=R)(x, y)
    with pytest.raises(fx_bk.UnsupportedModelError, match="mixes-samples"):
        fx_bk.transform(WithLoss(lambda o, t: F.cross_entropy(o, t) / o.detach().abs().sum()),
                        max_grad_norm=R)(x, y)
    with pytest.raises(fx_bk.UnsupportedModelError, match="class-weighted"):
        fx_bk.transform(WithLoss(lambda o, t: F.cross_entropy(o, t, weight=torch.ones(3))),
                        max_grad_norm=R)(x, y)


def test_loss_pairing_outputs_and_targets_of_different_samples_is_rejected():
    """Logits flattened batch-outer (``[B*T]``) against targets flattened batch-inner
    (``[T*B]``): row r's logits and target belong to different samples."""

    class Misaligned(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(7, 5), nn.Linear(5, 7)

        def forward(self, ids, labels):
            return F.cross_entropy(self.out(self.emb(ids)).flatten(0, 1), labels.t().flatten())

    ids = torch.randint(0, 7, (3, 4))
    with pytest.raises(fx_bk.UnsupportedModelError, match="pairs inputs and targets of different"):
        fx_bk.transform(Misaligned(), max_grad_norm=R)(ids, ids)


def test_a_python_callable_on_sample_data_is_proven_not_assumed():
    """A graph node whose target is not an aten op (a Python callable) and computes tensors
    from samples goes to the probe; only sizes and numbers are taken as shared."""
    from fx_bk._torch_internals import SymbolicBatchMode
    from passes.batch_locations import PROBE, SHARED, Context, Sample, transfer

    mode = SymbolicBatchMode()
    fake = mode.fake(torch.randn(3, 4), batched=True)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = fake
    flipped = graph.call_function(lambda t: t.flip(0), (x,))
    with mode.fake_mode:
        flipped.meta["val"] = fake.flip(0)
    locs = {x: Sample(0)}
    assert transfer(flipped, locs.__getitem__, Context(mode.batch_symbol)) is PROBE
    locs = {x: SHARED}
    assert transfer(flipped, locs.__getitem__, Context(mode.batch_symbol)) == SHARED


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_labelled_mean_is_checked_on_every_call(compiled):
    """A cross-entropy mean over labels that are not ignore_index is per-sample only while every
    sample has as many labels: checked by the graph on each call, compiled included."""

    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(7, 5), nn.Linear(5, 7)

        def forward(self, ids, labels):
            logits = self.out(self.emb(ids))
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    bk = fx_bk.transform(TokenModel(), max_grad_norm=R)
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    ids = torch.randint(0, 7, (3, 4))
    run(ids, ids).backward()  # every sample has 4 labels
    even = ids.clone()
    even[:, -1] = -100
    run(ids, even).backward()  # 3 each
    uneven = ids.clone()
    uneven[0, 2:] = -100
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"\[2, 4, 4\]"):
        run(ids, uneven)
