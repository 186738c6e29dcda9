"""A transformed module's life outside one training call: modules registered twice, copies and
checkpoints, evaluation without grad, transforming twice."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fx_bk
import fx_bk.testing
from fx_bk.testing import fx_bk_grads, max_rel_err


class TwiceRegistered(nn.Module):
    """One Linear reached by two names (``l.0`` and ``l.1``): one parameter, two sites."""

    def __init__(self):
        super().__init__()
        lin = nn.Linear(4, 4)
        self.l = nn.ModuleList([lin, lin])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for layer in self.l:
            x = torch.tanh(layer(x))
        return self.head(x)


def _batch(b=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, 4, generator=g, dtype=dtype), torch.randint(0, 3, (b,), generator=g)


def test_a_module_registered_twice_is_one_shared_weight_and_stays_intact():
    torch.manual_seed(0)
    model = TwiceRegistered().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    err = fx_bk.testing.assert_matches_per_sample(model, F.cross_entropy, _batch(),
                                                  max_grad_norm=0.1)
    assert err <= 1e-10
    for n, p in model.named_parameters():  # tracing left the model's own tensors in place
        assert type(p) is nn.Parameter and torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("copy_fn", [
    copy.deepcopy,
    lambda m: pickle.loads(pickle.dumps(m)),
    lambda m: torch.load(_saved(m), weights_only=False),
], ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("after_first_call", [False, True])
def test_copies_trace_their_own_program(copy_fn, after_first_call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    x, y = _batch()
    if after_first_call:
        fx_bk_grads(bk, model, x, y, "mean")
    clone = copy_fn(bk)
    assert not clone.programs
    clone_model = clone._module
    got = fx_bk_grads(clone, clone_model, x, y, "mean")
    ref = fx_bk_grads(bk, model, x, y, "mean")  # the original still works
    assert max_rel_err(got, ref) <= 1e-12
    assert clone_model[0].weight is not model[0].weight


def _saved(m) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_evaluation_without_grad_is_the_plain_forward(mode):
    model = nn.Sequential(nn.Linear(4, 3)).double()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    x, _ = _batch()
    with mode():
        out = bk(x)
    assert not bk.programs
    torch.testing.assert_close(out, model(x).detach())
    with mode():
        torch.compile(bk, fullgraph=True)(x)
    assert not bk.programs


def test_transforming_twice_is_an_error():
    bk = fx_bk.transform(nn.Linear(3, 3), max_grad_norm=1.0)
    with pytest.raises(fx_bk.UnsupportedModelError, match="already an fx_bk module"):
        fx_bk.transform(bk, max_grad_norm=1.0)
    outer = nn.Sequential(bk, nn.Linear(3, 2))
    with pytest.raises(fx_bk.UnsupportedModelError, match="module '0' is already an fx_bk"):
        fx_bk.transform(outer, max_grad_norm=1.0)


def test_unfreezing_after_per_layer_clipping_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).double()
    model[0].weight.requires_grad_(False)
    bk = fx_bk.transform(model, max_grad_norm=1.0, clipping_style="per-layer")
    model[0].weight.requires_grad_(True)  # its group was not resolved: its bound is unknown
    with pytest.raises(fx_bk.UnsupportedModelError, match=r"\['0.weight'\] are trainable but"):
        bk(_batch()[0])


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


def test_an_in_place_buffer_update_names_the_buffer_and_leaves_it_alone():
    model = Counter().double()
    with pytest.raises(fx_bk.UnsupportedModelError,
                       match=r"updates buffer 'calls' in place \(op aten\.add_ \(at File"):
        fx_bk.transform(model, max_grad_norm=1.0)(_batch()[0])
    assert model.calls.item() == 0  # neither the trace nor the check ran it for real


def test_programs_are_bounded_least_recently_used(monkeypatch):
    from fx_bk import runtime

    monkeypatch.setattr(runtime, "MAX_SIGNATURES", 2)
    model = nn.Linear(4, 3).double()
    bk = fx_bk.transform(model, max_grad_norm=1.0, dynamic=False)  # one trace per length

    def call(t):
        return bk(torch.randn(2, t, 4, dtype=torch.float64)).sum()

    call(1), call(2), call(1)
    with pytest.warns(UserWarning, match="more than 2 input signatures"):
        call(3)  # evicts T=2, the least recently used
    assert len(bk.programs) == 2
    call(2)  # traced again, quietly
    assert len(bk.programs) == 2


def test_a_module_freed_before_its_backward_still_clips_once():
    model = nn.Linear(4, 3).double()
    fx_bk.transform(model, max_grad_norm=1.0)(_batch()[0]).sum().backward()  # no reference left
    assert model.weight.grad is not None


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def test_a_trainable_parameter_the_forward_never_uses_gets_noise_from_the_engine():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = WithUnused()
    before = model.unused.weight.detach().clone()
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    module, opt, loader = fx_bk.PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(loader))
    opt.zero_grad()
    F.cross_entropy(module(x), y).backward()
    assert model.unused.weight.grad is None  # as in PyTorch: no use, no gradient
    opt.step()  # the engine's optimizer takes it as a zero clipped sum and adds noise
    assert not torch.equal(model.unused.weight.detach(), before)


class Changeable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)
        self.scale = 1.0

    def forward(self, x):
        return self.b(self.act(self.a(x)) * self.scale)


def _change(model, what):
    if what == "submodule":
        model.act = nn.ReLU()
    elif what == "attribute":
        model.scale = 3.0
    elif what == "forward hook":
        model.a.register_forward_hook(lambda mod, args, out: 2 * out)
    elif what == "parameter":
        model.b.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("what", ["submodule", "attribute", "forward hook", "parameter"])
def test_a_change_after_the_first_call_gives_a_fresh_trace(what):
    torch.manual_seed(0)
    model = Changeable().double()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    x, y = _batch()
    fx_bk_grads(bk, model, x, y, "mean")
    _change(model, what)
    got = fx_bk_grads(bk, model, x, y, "mean")
    assert max_rel_err(got, fx_bk.testing.vmap_clipped_sum(model, x, y, 0.1)) <= 1e-10
    # a new Parameter of the same shape is just another input of the same program
    assert len(bk.programs) == (1 if what == "parameter" else 2)


def test_a_submodule_replaced_after_compiling_gives_a_fresh_trace():
    torch.manual_seed(0)
    model = Changeable().double()
    bk = fx_bk.transform(model, max_grad_norm=0.1)
    step = torch.compile(bk, fullgraph=True)
    x, y = _batch()
    fx_bk_grads(step, model, x, y, "mean")
    _change(model, "submodule")
    got = fx_bk_grads(step, model, x, y, "mean")
    assert max_rel_err(got, fx_bk.testing.vmap_clipped_sum(model, x, y, 0.1)) <= 1e-10


@pytest.mark.parametrize("what", ["attribute", "forward hook"])
def test_a_change_dynamo_does_not_guard_is_an_error_after_compiling(what):
    """A plain attribute or a hook changed after compiling: Dynamo does not recompile, so the
    compiled graph's fx_bk::check_unchanged raises instead of running the stale program; after
    torch.compiler.reset() the new module is traced and exact."""
    torch.manual_seed(0)
    model = Changeable().double()
    step = torch.compile(fx_bk.transform(model, max_grad_norm=0.1), fullgraph=True)
    x, y = _batch()
    fx_bk_grads(step, model, x, y, "mean")
    _change(model, what)
    with pytest.raises(fx_bk.FxBkError, match=r"changed after torch.compile traced it"):
        fx_bk_grads(step, model, x, y, "mean")
    torch.compiler.reset()
    got = fx_bk_grads(step, model, x, y, "mean")
    assert max_rel_err(got, fx_bk.testing.vmap_clipped_sum(model, x, y, 0.1)) <= 1e-10


class TensorAttributes(nn.Module):
    """A constant in a plain attribute, and a cache the forward fills on its first call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = torch.arange(4.0)

    def forward(self, x):
        if getattr(self, "cache", None) is None:
            self.cache = torch.linspace(0.5, 1.0, 4)
        return self.lin(x) * self.scale.to(x.dtype) + self.cache.to(x.dtype)


def test_plain_tensor_attributes_are_constants_and_stay_real():
    torch.manual_seed(0)
    model = TensorAttributes().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    fx_bk.transform(model, max_grad_norm=1.0)(x)  # traced: the cache was filled with a fake
    assert not isinstance(model.scale, torch._subclasses.FakeTensor)
    assert getattr(model, "cache", None) is None  # ... and taken out again
    fx_bk.testing.assert_matches_per_sample(model, lambda out, _: out.pow(2).sum(), (x, None),
                                            max_grad_norm=0.05, loss_reduction="sum",
                                            tol=1e-12)


def test_clipping_bounds_live_on_the_modules_device():
    """A model moved to a device before ``transform`` gets its bounds there (a graph input the
    device's compiled kernels read: on CUDA a CPU bound broke every compiled step); ``.to()``
    afterwards moves them along."""
    bk = fx_bk.transform(nn.Linear(3, 2, device="meta"), max_grad_norm=1.0)
    assert bk.clip_bounds.device.type == "meta" and bk.clip_bounds.dtype == torch.float64
    bk = fx_bk.transform(nn.Linear(3, 2), max_grad_norm=1.0).to("meta")
    assert bk.clip_bounds.device.type == "meta"
