"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over an fx_bk module: 2 processes, gloo, CPU.

The fx_bk module is sharded as one unit, at its root (``fx_bk.distributed.fully_shard``, which
also points the engine's optimizer at FSDP's new parameters). FSDP averages the clipped sums
over the ranks, as DDP does, so the engine's distributed arithmetic applies unchanged. Checked
against one process on the concatenated batch: the gathered gradients (times W) and the updated
parameters, noise off; with noise on, the same generator seed on every rank gives exactly the
single-process update (each rank adds its shards' slice of the full noise: added once). A tiny
language model with a tied embedding/output weight, two clipping groups and "per-layer"
clipping (compiled); an empty batch on one rank. Every unsupported combination
(``fully_shard`` inside the wrapped model, an optimizer left on the replaced parameters, ...)
raises ``ConfigError`` naming what to do (docs/fsdp.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.tensor
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fx_bk

pytest.importorskip("opacus")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

import fx_bk.distributed  # noqa: E402

from .ranks import save_result, spawn_ranks, start_rank  # noqa: E402

WORLD, N, T, V, D = 2, 16, 5, 40, 24
SIGMA, SEED = 0.8, 1234
GROUPS = [["emb.weight", "ln.weight", "ln.bias"], ["mid.weight", "mid.bias"]]
BOUNDS = (0.3, 0.2)
HALVES = ((0, N // 2), (N // 2, N))
PER_LAYER = {"clipping_style": "per-layer", "max_grad_norm": 0.3}
DEADLINE_S = 240
STACKS_AFTER_S = 150


class TiedLM(nn.Module):
    """Embedding, LayerNorm, Linear, and an output Linear sharing the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.mid = nn.Linear(D, D)
        self.out = nn.Linear(D, V, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mid(self.ln(self.emb(tokens))))).mean(1)


def _model(device):
    torch.manual_seed(0)
    return TiedLM().to(device)


def _data(device):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (N, T), generator=g), torch.randint(0, V, (N,), generator=g)
    return x.to(device), y.to(device)


def _full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _engine_step(device, sigma, *, rank=None, clipping_style=GROUPS, max_grad_norm=BOUNDS,
                 compile=False):
    """One engine step on the whole batch (``rank=None``: one process, noise seeded with SEED)
    or, sharded, on this rank's half with every rank's generator reseeded with SEED."""
    model = _model(device)
    x, y = _data(device)
    seeded = {} if rank is not None else {"noise_generator": torch.Generator(device).manual_seed(
        SEED)}
    module, opt, criterion, _ = fx_bk.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=N // 4), noise_multiplier=sigma,
        max_grad_norm=max_grad_norm, clipping_style=clipping_style,
        criterion=nn.CrossEntropyLoss(), compile=compile, **seeded)
    if rank is not None:
        fx_bk.distributed.fully_shard(module, opt)
        opt.generator.manual_seed(SEED)  # the engine shares one random seed; fix it for the test
        lo, hi = HALVES[rank]
        x, y = x[lo:hi], y[lo:hi]
    opt.zero_grad()
    criterion(module(x), y).backward()
    grads = {n: _full(p.grad).cpu() for n, p in model.named_parameters()}
    opt.step()
    return {"grads": grads, "expected": opt.expected_batch_size,
            "params": {n: _full(p).detach().cpu() for n, p in model.named_parameters()}}


def _empty_rank_step(device, *, rank=None):
    """``fx_bk.transform`` and a plain SGD: rank 0 takes the whole batch, rank 1 none."""
    model = _model(device)
    bk = fx_bk.transform(model, max_grad_norm=0.3, loss_reduction="sum")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = _data(device)
    if rank is not None:
        fx_bk.distributed.fully_shard(bk, opt)
        x, y = (x, y) if rank == 0 else (x[:0], y[:0])
    opt.zero_grad()
    nn.functional.cross_entropy(bk(x), y, reduction="sum").backward()
    grads = {n: _full(p.grad).cpu() for n, p in model.named_parameters()}
    opt.step()
    return {"grads": grads,
            "params": {n: _full(p).detach().cpu() for n, p in model.named_parameters()}}


def _error(fn) -> str:
    try:
        fn()
    except fx_bk.FxBkError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _errors(device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x, y = _data(device)

    def layer_then_transform():
        model = _model(device)
        fully_shard(model.mid)
        fx_bk.transform(model, max_grad_norm=0.3)

    def transform_then_layer():
        model = _model(device)
        bk = fx_bk.transform(model, max_grad_norm=0.3)
        fully_shard(model.mid)
        fully_shard(bk)
        bk(x)

    def plain_model():
        fx_bk.distributed.fully_shard(_model(device))

    def twice():
        bk = fx_bk.transform(_model(device), max_grad_norm=0.3)
        fx_bk.distributed.fully_shard(bk)
        fx_bk.distributed.fully_shard(bk)

    def ignored_trainable():
        model = _model(device)
        fx_bk.distributed.fully_shard(fx_bk.transform(model, max_grad_norm=0.3),
                                      ignored_params={model.mid.weight})

    def mesh_of_one_rank():
        mesh = init_device_mesh(torch.device(device).type, (WORLD, 1),
                                mesh_dim_names=("dp", "tp"))
        fx_bk.distributed.fully_shard(fx_bk.transform(_model(device), max_grad_norm=0.3),
                                      mesh=mesh["tp"])

    def optimizer_left_behind():  # torch's fully_shard after make_private, optimizer not moved
        model = _model(device)
        module, opt, _ = fx_bk.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=N // 4),
            noise_multiplier=0.0, max_grad_norm=0.3)
        fully_shard(module)
        nn.functional.cross_entropy(module(x), y).backward()
        opt.step()

    cases = [layer_then_transform, transform_then_layer, plain_model, twice, ignored_trainable,
             mesh_of_one_rank, optimizer_left_behind]
    return {f.__name__: _error(f) for f in cases}


def _worker(rank, init_file, out_dir, backend):
    start_rank(rank, WORLD, init_file, out_dir, backend, stacks_after_s=STACKS_AFTER_S)
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    results = {
        "plain": _engine_step(device, 0.0, rank=rank),
        "noisy": _engine_step(device, SIGMA, rank=rank),
        "empty": _empty_rank_step(device, rank=rank),
    }
    if backend == "gloo":
        results["compiled"] = _engine_step(device, 0.0, rank=rank, compile=True, **PER_LAYER)
        results["errors"] = _errors(device)
    save_result(rank, out_dir, results)


def _spawn(backend):
    return spawn_ranks(_worker, (backend,), WORLD, "FSDP", DEADLINE_S, STACKS_AFTER_S)


@pytest.fixture(scope="module")
def ranks():
    return _spawn("gloo")


def _assert_same_update(ranks, case, reference):
    for r in ranks:
        for name, full in reference["grads"].items():  # FSDP averages the clipped sums
            torch.testing.assert_close(r[case]["grads"][name] * WORLD, full, rtol=1e-5,
                                       atol=1e-6, msg=lambda m, n=name: f"{case} grad {n}: {m}")
        for name, want in reference["params"].items():
            torch.testing.assert_close(r[case]["params"][name], want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{case} param {n}: {m}")


def test_fsdp_update_equals_one_process_on_the_whole_batch(ranks):
    reference = _engine_step("cpu", 0.0)
    for r in ranks:
        assert r["plain"]["expected"] * WORLD == reference["expected"]
    _assert_same_update(ranks, "plain", reference)


def test_fsdp_noise_is_the_single_process_noise_added_once(ranks):
    # same seed: each coordinate gets the one-process noise, once (W times: std * sqrt(W))
    reference = _engine_step("cpu", SIGMA)
    _assert_same_update(ranks, "noisy", reference)
    noise = torch.cat([(ranks[0]["noisy"]["params"][n] - ranks[0]["plain"]["params"][n]).flatten()
                       for n in reference["params"]])
    sensitivity = sum(b * b for b in BOUNDS) ** 0.5
    assert noise.std().item() == pytest.approx(SIGMA * sensitivity / reference["expected"],
                                               rel=0.1)


def test_fsdp_with_an_empty_batch_on_one_rank(ranks):
    reference = _empty_rank_step("cpu")
    sgd_on_the_average = {  # plain SGD steps on FSDP's average, (sum over ranks) / W
        "grads": reference["grads"],
        "params": {n: p + (reference["params"][n] - p) / WORLD
                   for n, p in _model("cpu").named_parameters()}}
    _assert_same_update(ranks, "empty", {k: {n: t.detach() for n, t in v.items()}
                                         for k, v in sgd_on_the_average.items()})


def test_fsdp_compiled_with_per_layer_clipping(ranks):
    _assert_same_update(ranks, "compiled", _engine_step("cpu", 0.0, **PER_LAYER))


@pytest.mark.parametrize("case, words", [
    ("layer_then_transform", ["['mid']", "fx_bk.distributed.fully_shard"]),
    ("transform_then_layer", ["['mid']", "fx_bk.distributed.fully_shard"]),
    ("plain_model", ["takes the module fx_bk.transform"]),
    ("twice", ["already sharded", "shard it once"]),
    ("ignored_trainable", ["['_module.mid.weight']", "ignored_params"]),
    ("mesh_of_one_rank", ["spans 1 of the 2 ranks"]),
    ("optimizer_left_behind", ["no longer the model's", "fx_bk.distributed.fully_shard"]),
])
def test_fsdp_misuse_is_a_config_error(ranks, case, words):
    for r in ranks:
        message = r["errors"][case]
        assert message.startswith("ConfigError: "), message
        for w in words:
            assert w in message, message


@pytest.mark.skipif(torch.cuda.device_count() < WORLD or not dist.is_nccl_available(),
                    reason=f"needs {WORLD} CUDA devices and NCCL")
def test_fsdp_nccl_on_gpus():
    got = _spawn("nccl")
    _assert_same_update(got, "plain", _engine_step("cuda:0", 0.0))
    _assert_same_update(got, "noisy", _engine_step("cuda:0", SIGMA))
