"""fx_bk on CUDA (skipped without a GPU; run by ``benchmarks/gpu_check.sh``): the Triton ghost-norm
kernel compiled for the GPU (not interpreted), and the oracle checks of three reference models
(MLP, transformer, GroupNorm CNN), eager and compiled, in float32 and under bf16 autocast,
against the float64 CPU vmap oracle.

TF32 is off in these tests (PyTorch enables it for cuDNN convolutions by default): float32 is
then held to the float32 bound of the CPU tests, 1e-5; bf16 autocast to ``BF16_TOL``, the
bound of ``tests/test_mixed_precision.py``, or twice plain non-private AMP's own error on the
same model and batch where that is larger (the CNN: about 6e-2 on CPU, fx_bk's the same).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fx_bk
from fx_bk.kernels.ghost_norm import ghost_norm_reference
from fx_bk.testing import fx_bk_grads, max_rel_err, vmap_clipped_sum
from fx_bk.testing.models import MODELS, batch_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F32_TOL = 1e-5
BF16_TOL = 3e-2  # bf16 keeps 8 significant bits (tests/test_mixed_precision.py)
KERNEL_SHAPES = [(2, 5, 7, 3), (3, 40, 33, 20), (1, 64, 16, 48), (2, 1, 8, 8), (4, 300, 64, 96)]
ORACLE_MODELS = ["mlp", "transformer", "resnet_gn"]


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_triton_ghost_norm_kernel_on_gpu(dtype):
    """The kernel against the full Gram formula in float64 of the same (rounded) inputs; the
    custom op dispatches to it on CUDA, eager and compiled."""
    pytest.importorskip("triton")
    from fx_bk.kernels.triton_ghost_norm import triton_ghost_norm

    for b, t, d, p in KERNEL_SHAPES:
        g = torch.Generator().manual_seed(t)
        a = torch.randn(b, t, d, generator=g).to("cuda", dtype)
        q = torch.randn(b, t, p, generator=g).to("cuda", dtype)
        want = ghost_norm_reference(a.double().cpu(), q.double().cpu())
        got = triton_ghost_norm(a, q)
        assert got.is_cuda and got.dtype == torch.float32
        err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-4), ((b, t, d, p), err)
        op = torch.ops.fx_bk.ghost_norm(a, q)
        torch.testing.assert_close(op, got, rtol=1e-5, atol=0)
    compiled = torch.compile(lambda a, q: torch.ops.fx_bk.ghost_norm(a, q) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(a, q), 2 * got, rtol=1e-5, atol=0)


def _oracle(model, x, y, r) -> dict:
    """The float64 CPU vmap oracle of ``model``'s clipped sum (a float64 copy of the model)."""
    ref = copy.deepcopy(model).cpu().double()
    x64 = x.cpu().double() if x.is_floating_point() else x.cpu()
    return vmap_clipped_sum(ref, x64, y.cpu(), r)


def _plain_amp_err(model, x, y) -> float:
    """Non-private AMP's error on ``model`` and this batch: the mean loss's gradient with the
    forward under bf16 autocast on CUDA, against float64 on CPU."""
    grads = {}
    for amp in (True, False):
        m = copy.deepcopy(model)
        m, xm = (m.cuda(), x.cuda()) if amp else (m.cpu().double(), x.cpu().double() if
                                                    x.is_floating_point() else x.cpu())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = m(xm)
        torch.nn.functional.cross_entropy(out.float() if amp else out, y.to(out.device)).backward()
        grads[amp] = _cpu64({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    return max_rel_err(grads[True], grads[False])


def _setup(name, r, compiled, seed=0, b=8):
    torch.manual_seed(seed)
    model = MODELS[name]()
    x, y = batch_for(name, model, b, seed=seed)
    ref = _oracle(model, x, y, r)
    model = model.cuda()
    bk = fx_bk.transform(model, max_grad_norm=r, loss_reduction="mean")
    run = torch.compile(bk, fullgraph=True) if compiled else bk
    return model, run, x.cuda(), y.cuda(), ref


def _cpu64(grads: dict) -> dict:
    return {n: g.double().cpu() for n, g in grads.items()}


@pytest.mark.parametrize(("compiled", "r"), [(False, 1e-3), (False, 0.5), (True, 1e-3)],
                         ids=["eager-clipped", "eager-R0.5", "compiled-clipped"])
@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_float32_on_cuda_matches_f64_oracle(name, r, compiled):
    """Every sample clipped (R = 1e-3), and some (R = 0.5); compiled once (compile time)."""
    model, run, x, y, ref = _setup(name, r, compiled)
    got = fx_bk_grads(run, model, x, y, "mean")
    assert all(g.is_cuda for g in got.values())
    assert max_rel_err(_cpu64(got), ref) <= F32_TOL


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_bf16_autocast_on_cuda_matches_f64_oracle(name, compiled):
    """The forward under ``torch.autocast("cuda", bfloat16)``, loss in float32 and backward
    outside it, as AMP does."""
    model, run, x, y, ref = _setup(name, 0.5, compiled, seed=1)
    amp_err = _plain_amp_err(model, x, y)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(x)
    assert out.dtype == torch.bfloat16
    torch.nn.functional.cross_entropy(out.float(), y).backward()
    got = {n: p.grad.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.dtype == torch.float32 for g in got.values())
    assert max_rel_err(_cpu64(got), ref) <= max(BF16_TOL, 2 * amp_err)


def test_rounding_guard_on_cuda():
    """The Triton kernel's norms of samples whose terms cancel (tests/test_rounding_bound.py):
    unguarded, a sample adds several R; the op recomputes them in float64 on the GPU, also
    while a CUDA graph is captured (every sample then). With TF32 matmuls (refused by fx_bk,
    fx_bk/precision_guard.py) the clipped GEMM alone lets such a sample exceed R."""
    pytest.importorskip("triton")
    from fx_bk.kernels.triton_ghost_norm import triton_ghost_norm
    from tests.test_rounding_bound import _cancelling, _contributions

    a, g = (t.cuda() for t in _cancelling(256, 768, 768, seed=11))
    assert _contributions(triton_ghost_norm(a, g), a, g).max() > 1.2
    norms = torch.ops.fx_bk.ghost_norm(a, g)
    assert _contributions(norms, a, g).max() <= 1 + 1e-6
    graphed = torch.compile(lambda a, g: torch.ops.fx_bk.ghost_norm(a, g), mode="reduce-overhead")
    for _ in range(3):  # warm-up, capture, replay
        got = graphed(a, g)
    torch.testing.assert_close(got, norms, rtol=1e-5, atol=0)
    ap, gp = (torch.nn.functional.pad(t, (0, 0, 0, 62)) for t in (a, g))
    torch.backends.cuda.matmul.allow_tf32 = True
    assert _contributions(norms, ap, gp).max() > 1.2


@pytest.mark.parametrize("name", ["mlp", "resnet_gn"])
def test_tf32_refused_on_cuda(name):
    """cuDNN's TF32 (PyTorch's default) is refused for models with convolution sites, TF32
    matmuls for every model: no gradient is written."""
    model, run, x, y, _ = _setup(name, 0.5, compiled=False)
    torch.backends.cudnn.allow_tf32 = True
    if name == "resnet_gn":
        with pytest.raises(fx_bk.ReducedPrecisionError, match="cudnn.allow_tf32"):
            run(x)
    else:
        run(x)
    torch.backends.cuda.matmul.allow_tf32 = True
    with pytest.raises(fx_bk.ReducedPrecisionError, match="TF32"):
        run(x)
    assert all(p.grad is None for p in model.parameters())
