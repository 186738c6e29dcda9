"""fx_bk refuses a step whose norms or clipped sums would run in reduced float32 precision
(``fx_bk/precision_guard.py``): TF32 or bf16 GEMMs and convolutions let rounding add more than
``max_grad_norm`` of one sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_bk
from fx_bk import precision_guard
from fx_bk.kernels.ghost_norm import ghost_norm
from tests.test_rounding_bound import _cancelling, _contributions


@pytest.fixture(autouse=True)
def _restore_precision():
    """Back to IEEE float32 through the same (legacy) API the tests use to leave it, so that
    PyTorch's getters do not see a mix of its two precision APIs."""
    cudnn = torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.mkldnn.conv.fp32_precision = "none"
    torch.backends.cudnn.allow_tf32 = cudnn


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _batch(model):
    x = torch.randn(6, 3, 8, 8) if isinstance(model[0], nn.Conv2d) else torch.randn(6, 8)
    return x, torch.randint(0, 3, (6,))


def _step(bk, x, y):
    nn.functional.cross_entropy(bk(x), y).backward()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_reduced_matmul_precision_refused_before_any_gradient(compiled):
    model = _mlp()
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    x, y = _batch(model)
    _step(run, x, y)  # IEEE: fine
    model.zero_grad(set_to_none=True)
    torch.set_float32_matmul_precision("medium")
    with pytest.raises(fx_bk.ReducedPrecisionError) as err:
        _step(run, x, y)
    msg = str(err.value)
    for words in ("torch.backends.mkldnn.matmul.fp32_precision", "Sequential", "'0.weight'",
                  "rule 'linear'", "set_float32_matmul_precision('highest')", "max_grad_norm"):
        assert words in msg, (words, msg)
    assert all(p.grad is None for p in model.parameters())
    torch.set_float32_matmul_precision("highest")  # and the same module trains again
    _step(run, x, y)
    assert all(p.grad is not None for p in model.parameters())


def test_reduced_conv_precision_refused_only_with_convolution_sites():
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    mlp = _mlp()
    _step(fx_bk.transform(mlp, max_grad_norm=1.0), *_batch(mlp))  # no conv site: runs
    cnn = _cnn()
    with pytest.raises(fx_bk.ReducedPrecisionError, match=r"CPU convolutions.*rule 'conv'"):
        _step(fx_bk.transform(cnn, max_grad_norm=1.0), *_batch(cnn))
    assert all(p.grad is None for p in cnn.parameters())


def test_cuda_settings_are_read_without_a_gpu():
    """The CUDA flags are plain globals: cuDNN's TF32 (PyTorch's default) and TF32 matmuls."""
    torch.backends.cudnn.allow_tf32 = True
    assert set(precision_guard.reduced_settings("cuda")) == {"conv"}
    torch.set_float32_matmul_precision("high")
    assert set(precision_guard.reduced_settings("cuda")) == {"matmul", "conv"}
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    assert precision_guard.reduced_settings("cuda") == {}
    assert precision_guard.reduced_settings("cpu") == {}


def _rounds_in_bf16() -> bool:
    """Whether this CPU runs float32 matmuls in bf16 under 'medium' (bf16 units needed)."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    exact = a.double() @ b.double()
    torch.set_float32_matmul_precision("medium")
    try:
        err = ((a @ b).double() - exact).abs().max() / exact.abs().max()
    finally:
        torch.set_float32_matmul_precision("highest")
    return err.item() > 1e-4


def test_why_reduced_precision_is_refused():
    """The hazard itself, at the op level: norms from the guarded ghost-norm op, then the
    clipped GEMM in bf16-rounded float32 matmuls. Samples whose terms cancel add up to many R
    (IEEE float32: at most R)."""
    if not _rounds_in_bf16():
        pytest.skip("this CPU computes float32 matmuls in float32 under 'medium'")
    a, g = _cancelling(64, 768, 768, seed=3)
    norms = ghost_norm(a, g)
    # zero positions up to 64 per sample: oneDNN keeps GEMMs with a short inner dim in float32
    a, g = (torch.nn.functional.pad(t, (0, 0, 0, 62)) for t in (a, g))
    assert _contributions(norms, a, g).max() <= 1 + 1e-6
    torch.set_float32_matmul_precision("medium")
    assert _contributions(norms, a, g).max() > 2
