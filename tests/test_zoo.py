"""fx_bk on architectures it was not written for (``tests/zoo.py``), against the per-sample loop.

Every entry: exact in float64 eager (to the model's own batch-vs-loop rounding where it computes
parts in float32) and in float32 eager; a subset also compiled with ``fullgraph=True``. Entries
fx_bk cannot prove exact must be rejected with an error naming the op, never a wrong gradient.
The entries marked ``ci=False`` run with ``-m zoo_full``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fx_bk

from . import zoo

pytest.importorskip("transformers")

F64_TOL = 1e-12
F32_TOL = 2e-5  # relative, per parameter: float32 rounding of the forward and the norms
COMPILED = {"llama", "convnext_like", "resnetv2_stdconv_like"}


def _param(arch):
    marks = [] if arch.ci else [pytest.mark.zoo_full]
    return pytest.param(arch, id=arch.name, marks=marks)


EXACT = [_param(a) for a in zoo.ZOO if a.expect == "exact"]
REJECTED = [_param(a) for a in zoo.ZOO if a.expect != "exact"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("arch", EXACT)
def test_float64_eager_is_exact(arch):
    err = zoo.check(arch, dtype=torch.float64)
    floor = zoo.model_floor(arch)
    assert err <= max(F64_TOL, 10 * floor), f"{arch.name}: {err:.1e} (model floor {floor:.1e})"


@pytest.mark.parametrize("arch", EXACT)
def test_float32_eager_is_exact(arch):
    err = zoo.check(arch, dtype=torch.float32)
    assert err <= F32_TOL, f"{arch.name}: {err:.1e}"


@pytest.mark.parametrize("arch", [_param(a) for a in zoo.ZOO if a.name in COMPILED]
                         + [_param(zoo.Arch(a.name, a.family, a.build, ci=False))
                            for a in zoo.ZOO if a.expect == "exact" and a.name not in COMPILED])
def test_float32_compiled_fullgraph_is_exact(arch):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):  # Dynamo's switch for RNN modules
        err = zoo.check(arch, dtype=torch.float32, compiled=True)
    assert err <= F32_TOL, f"{arch.name}: {err:.1e}"


@pytest.mark.parametrize("arch", REJECTED)
def test_unsupported_architecture_is_rejected_naming_the_op(arch):
    op = arch.expect.split(":", 1)[1].split()[0]
    with pytest.raises(fx_bk.UnsupportedModelError, match=op.replace(".", r"\.")):
        zoo.check(arch, dtype=torch.float64)


def test_gpt2_with_its_generation_cache_compiles_exactly():
    """GPT-2 with its default ``use_cache=True``, compiled, attention as matmuls (the eager
    implementation; the SDPA one takes the same math path with dropout in training): the
    cache's first update (a ``cat`` of an empty tensor and the transposed keys) is traced as
    the contiguous copy eager ``cat`` returns. Traced as ``cat``, torch.compile's own trace of
    the BK program gave it other strides and failed on the matmul's ``view`` ("Cannot view a
    tensor with shape ..."; fails that way without the rewrite, checked)."""
    arch = zoo.Arch("gpt2_cache", "generation cache", zoo._causal(
        "GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=zoo.D, n_head=2, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager"))
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="DynamicCache"):
        err = zoo.check(arch, dtype=torch.float32, compiled=True)
    assert err <= F32_TOL, f"{err:.1e}"


def test_generation_cache_output_is_dropped_with_a_warning():
    """A decoder with its default use_cache=True returns a DynamicCache: fx_bk returns None in
    its place (and warns), the logits are unchanged."""
    torch.manual_seed(0)
    model, make_input, _ = zoo.by_name("llama").build()
    assert model.config.use_cache
    x = make_input(torch.Generator().manual_seed(0), 2)
    bk = fx_bk.transform(model, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="DynamicCache.*use_cache=False"):
        out = bk(x)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, model(x, use_cache=False).logits)
